#!/bin/sh
# remora-init: the init step of a meshed pod or compose service. Installs the
# interception rules in the current network namespace with `remora-proxy init`,
# then prints the nat table. Run as root with NET_ADMIN and NET_RAW, before the
# proxy and the app start; exits non-zero when the rules could not be installed.
#
# Arguments go to `remora-proxy init` (for example --exclude-inbound-ports 22).
# The exclusions can also come from the environment:
#   REMORA_EXCLUDE_INBOUND_PORTS   inbound ports left alone, comma-separated
#   REMORA_EXCLUDE_OUTBOUND_PORTS  outbound ports left alone
#   REMORA_EXCLUDE_OUTBOUND_CIDRS  outbound destinations left alone
#   REMORA_PROXY_UID, REMORA_INBOUND_PORT, REMORA_OUTBOUND_PORT
set -u

proxy=${REMORA_PROXY_BIN:-remora-proxy}

for var in REMORA_EXCLUDE_INBOUND_PORTS REMORA_EXCLUDE_OUTBOUND_PORTS REMORA_EXCLUDE_OUTBOUND_CIDRS; do
    eval "value=\${$var:-}"
    if [ -n "$value" ]; then
        echo "remora-init: $var=$value"
    fi
done

if ! "$proxy" init "$@"; then
    echo "remora-init: installing the interception rules failed" >&2
    exit 1
fi

echo "remora-init: done; the nat table is now:"
if ! iptables -t nat -S; then
    echo "remora-init: cannot list the rules with iptables" >&2
    exit 1
fi
if [ -s /proc/net/if_inet6 ] && command -v ip6tables >/dev/null 2>&1; then
    echo "remora-init: IPv6:"
    ip6tables -t nat -S || exit 1
fi
