//! `remora-proxy init`: installs the interception rules in the current network
//! namespace, as istio-init and linkerd's proxy-init do. Inbound TCP goes to
//! the inbound port, outbound TCP to the outbound port, except the proxy's own
//! UID, loopback, the proxy's own ports, and excluded ports and CIDRs.
//!
//! The rules live in Remora's own chains, so installing is idempotent (the
//! chains are flushed and refilled; the jumps into them are added once) and
//! `--cleanup` removes exactly what was added.

use clap::Args;
use std::process::Command;

#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    /// The proxy's UID, whose own traffic is never redirected.
    #[arg(long, env = "REMORA_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    #[arg(long, env = "REMORA_INBOUND_PORT", default_value_t = 15006)]
    pub inbound_port: u16,
    #[arg(long, env = "REMORA_OUTBOUND_PORT", default_value_t = 15001)]
    pub outbound_port: u16,
    /// The proxy's other ports (admin, health), never redirected.
    #[arg(long, value_delimiter = ',', default_value = "15000,15020")]
    pub proxy_ports: Vec<u16>,
    /// Inbound ports left alone (comma-separated).
    #[arg(long, env = "REMORA_EXCLUDE_INBOUND_PORTS", value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports left alone (comma-separated).
    #[arg(long, env = "REMORA_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations left alone (comma-separated CIDRs).
    #[arg(long, env = "REMORA_EXCLUDE_OUTBOUND_CIDRS", value_delimiter = ',')]
    pub exclude_outbound_cidrs: Vec<String>,
    /// IPv6 rules: auto (when the namespace has IPv6), on, off.
    #[arg(long, default_value = "auto")]
    pub ipv6: String,
    /// Print the commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the rules instead of installing them.
    #[arg(long)]
    pub cleanup: bool,
}

const CHAINS: [&str; 4] = [
    "REMORA_INBOUND",
    "REMORA_IN_REDIRECT",
    "REMORA_OUTPUT",
    "REMORA_OUT_REDIRECT",
];

/// One iptables invocation (without the binary name).
type Rule = Vec<String>;

fn r(parts: &[&str]) -> Rule {
    parts.iter().map(|s| s.to_string()).collect()
}

/// `iptables -t nat -A CHAIN RULE...` (no value here contains a space).
fn append(chain: &str, rule: &str) -> Rule {
    let mut v = r(&["-t", "nat", "-A", chain]);
    v.extend(rule.split_whitespace().map(str::to_string));
    v
}

/// The rules for one address family.
pub fn rules(a: &InitArgs, v6: bool) -> Vec<Rule> {
    let loopback = if v6 { "::1/128" } else { "127.0.0.1/32" };
    let mut out = Vec::new();
    for c in CHAINS {
        out.push(r(&["-t", "nat", "-N", c]));
        out.push(r(&["-t", "nat", "-F", c]));
    }
    let (inbound, outbound) = (a.inbound_port, a.outbound_port);
    out.push(append(
        "REMORA_IN_REDIRECT",
        &format!("-p tcp -j REDIRECT --to-ports {inbound}"),
    ));
    out.push(append(
        "REMORA_OUT_REDIRECT",
        &format!("-p tcp -j REDIRECT --to-ports {outbound}"),
    ));
    // Inbound: everything but the proxy's own ports and the excluded ones.
    let mut skip_in: Vec<u16> = vec![inbound, outbound];
    skip_in.extend(&a.proxy_ports);
    skip_in.extend(&a.exclude_inbound_ports);
    skip_in.sort_unstable();
    skip_in.dedup();
    for p in skip_in {
        out.push(append(
            "REMORA_INBOUND",
            &format!("-p tcp --dport {p} -j RETURN"),
        ));
    }
    out.push(append("REMORA_INBOUND", "-p tcp -j REMORA_IN_REDIRECT"));
    // Outbound: not the proxy's own traffic, not loopback, not excluded.
    let uid = a.proxy_uid;
    out.push(append(
        "REMORA_OUTPUT",
        &format!("-m owner --uid-owner {uid} -j RETURN"),
    ));
    out.push(append("REMORA_OUTPUT", "-o lo -j RETURN"));
    out.push(append("REMORA_OUTPUT", &format!("-d {loopback} -j RETURN")));
    for p in &a.exclude_outbound_ports {
        out.push(append(
            "REMORA_OUTPUT",
            &format!("-p tcp --dport {p} -j RETURN"),
        ));
    }
    for cidr in &a.exclude_outbound_cidrs {
        if cidr.contains(':') == v6 {
            out.push(append("REMORA_OUTPUT", &format!("-d {cidr} -j RETURN")));
        }
    }
    out.push(append("REMORA_OUTPUT", "-p tcp -j REMORA_OUT_REDIRECT"));
    out
}

/// The jumps from the built-in chains into Remora's.
fn jumps() -> Vec<Rule> {
    vec![
        r(&[
            "-t",
            "nat",
            "PREROUTING",
            "-p",
            "tcp",
            "-j",
            "REMORA_INBOUND",
        ]),
        r(&["-t", "nat", "OUTPUT", "-p", "tcp", "-j", "REMORA_OUTPUT"]),
    ]
}

fn with_op(jump: &Rule, op: &str) -> Rule {
    let mut v = jump.clone();
    v.insert(2, op.to_string());
    v
}

fn has_ipv6() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|s| !s.trim().is_empty())
}

fn run(bin: &str, args: &Rule, dry_run: bool, tolerate: bool) -> anyhow::Result<bool> {
    if dry_run {
        println!("{bin} {}", args.join(" "));
        return Ok(true);
    }
    let out = Command::new(bin)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {bin}: {e} (is iptables installed?)"))?;
    if !out.status.success() && !tolerate {
        anyhow::bail!(
            "{bin} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.status.success())
}

/// An IPv4 or IPv6 address with an optional prefix length, as iptables takes.
fn valid_cidr(c: &str) -> bool {
    let (ip, prefix) = c.split_once('/').map_or((c, None), |(i, p)| (i, Some(p)));
    let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|p| p <= max))
}

pub fn init(a: &InitArgs) -> anyhow::Result<()> {
    if let Some(bad) = a.exclude_outbound_cidrs.iter().find(|c| !valid_cidr(c)) {
        anyhow::bail!("--exclude-outbound-cidrs: {bad:?} is not an address or CIDR");
    }
    let v6 = match a.ipv6.as_str() {
        "on" => true,
        "off" => false,
        "auto" => has_ipv6(),
        other => anyhow::bail!("--ipv6 {other:?}: expected auto, on or off"),
    };
    let mut families = vec![("iptables", false)];
    if v6 {
        families.push(("ip6tables", true));
    }
    for (bin, is_v6) in families {
        if a.cleanup {
            for j in jumps() {
                // Delete every copy of the jump.
                while run(bin, &with_op(&j, "-D"), a.dry_run, true)? && !a.dry_run {}
            }
            for c in CHAINS {
                run(bin, &r(&["-t", "nat", "-F", c]), a.dry_run, true)?;
                run(bin, &r(&["-t", "nat", "-X", c]), a.dry_run, true)?;
            }
            continue;
        }
        for rule in rules(a, is_v6) {
            // Creating a chain that exists fails harmlessly; flushing follows.
            let tolerate = rule.get(2).is_some_and(|op| op == "-N");
            run(bin, &rule, a.dry_run, tolerate)?;
        }
        for j in jumps() {
            let present = !a.dry_run && run(bin, &with_op(&j, "-C"), false, true)?;
            if !present {
                run(bin, &with_op(&j, "-A"), a.dry_run, false)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> InitArgs {
        InitArgs {
            proxy_uid: 1337,
            inbound_port: 15006,
            outbound_port: 15001,
            proxy_ports: vec![15000, 15020],
            exclude_inbound_ports: vec![22],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec!["10.1.0.0/16".into(), "fd00::/8".into()],
            ipv6: "off".into(),
            dry_run: true,
            cleanup: false,
        }
    }

    #[test]
    fn cidrs_are_checked_before_any_rule_is_built() {
        assert!(valid_cidr("10.1.0.0/16") && valid_cidr("fd00::/8") && valid_cidr("10.0.0.1"));
        assert!(!valid_cidr("10.0.0.0/33") && !valid_cidr("nonsense"));
        let mut a = args();
        a.exclude_outbound_cidrs = vec!["10.0.0.0/8 -j ACCEPT".into()];
        let e = init(&a).unwrap_err().to_string();
        assert!(e.contains("not an address or CIDR"), "{e}");
    }

    #[test]
    fn rules_exclude_uid_loopback_own_ports_and_exclusions() {
        let text: Vec<String> = rules(&args(), false).iter().map(|r| r.join(" ")).collect();
        let all = text.join("\n");
        assert!(all.contains("--uid-owner 1337 -j RETURN"));
        assert!(all.contains("-A REMORA_OUTPUT -o lo -j RETURN"));
        assert!(all.contains("--dport 15020 -j RETURN"));
        assert!(all.contains("--dport 22 -j RETURN"));
        assert!(all.contains("--dport 5432 -j RETURN"));
        assert!(all.contains("-d 10.1.0.0/16 -j RETURN"));
        assert!(
            !all.contains("fd00::/8"),
            "an IPv6 CIDR stays out of iptables"
        );
        assert!(all.contains("REDIRECT --to-ports 15006"));
        assert!(all.contains("REDIRECT --to-ports 15001"));
        // The UID exclusion comes before the redirect.
        let uid = text.iter().position(|l| l.contains("--uid-owner")).unwrap();
        let redirect = text
            .iter()
            .position(|l| l.ends_with("-j REMORA_OUT_REDIRECT"))
            .unwrap();
        assert!(uid < redirect);
        let v6: String = rules(&args(), true)
            .iter()
            .map(|r| r.join(" "))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(v6.contains("-d ::1/128 -j RETURN") && v6.contains("fd00::/8"));
    }
}
