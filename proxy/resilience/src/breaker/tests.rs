//! The circuit breaker's tests: each transition of issue 4 §3, by name.

use super::*;
use tokio::time::advance;

fn config() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: Some(3),
        failure_rate: None,
        min_requests: 10,
        window: Duration::from_secs(10),
        open_for: Duration::from_secs(10),
        max_open_for: Duration::from_secs(35),
        half_open_requests: 1,
    }
}

fn fail(breaker: &Breaker, n: usize) {
    for _ in 0..n {
        breaker.admit().expect("admitted").record(false);
    }
}

fn succeed(breaker: &Breaker, n: usize) {
    for _ in 0..n {
        breaker.admit().expect("admitted").record(true);
    }
}

#[tokio::test(start_paused = true)]
async fn opens_after_n_consecutive_failures() {
    let breaker = Breaker::new(&config()).unwrap();
    fail(&breaker, 2);
    assert_eq!(breaker.state(), BreakerState::Closed);
    fail(&breaker, 1);
    assert_eq!(breaker.state(), BreakerState::Open);
    assert_eq!(breaker.opened_total(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_success_resets_the_consecutive_count() {
    let breaker = Breaker::new(&config()).unwrap();
    fail(&breaker, 2);
    succeed(&breaker, 1);
    fail(&breaker, 2);
    assert_eq!(breaker.state(), BreakerState::Closed);
    fail(&breaker, 1);
    assert_eq!(breaker.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn rejects_while_open_and_is_unavailable() {
    let breaker = Breaker::new(&config()).unwrap();
    fail(&breaker, 3);
    for _ in 0..100 {
        assert!(breaker.admit().is_none());
    }
    assert!(!breaker.is_available());
    advance(Duration::from_millis(9_999)).await;
    assert!(breaker.admit().is_none());
    assert!(!breaker.is_available());
    advance(Duration::from_millis(1)).await;
    assert!(breaker.is_available());
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_exactly_the_configured_probes() {
    let breaker = Breaker::new(&BreakerConfig {
        half_open_requests: 3,
        ..config()
    })
    .unwrap();
    fail(&breaker, 3);
    advance(Duration::from_secs(10)).await;
    let probes: Vec<_> = (0..3).map(|_| breaker.admit().expect("probe")).collect();
    assert!(probes.iter().all(Admission::is_probe));
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    assert!(breaker.admit().is_none());
    assert!(!breaker.is_available());
    // All three must succeed to close.
    let mut probes = probes.into_iter();
    probes.next().unwrap().record(true);
    probes.next().unwrap().record(true);
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    assert!(
        breaker.admit().is_none(),
        "used probes are not handed out again"
    );
    probes.next().unwrap().record(true);
    assert_eq!(breaker.state(), BreakerState::Closed);
    let admission = breaker.admit().unwrap();
    assert!(!admission.is_probe());
}

#[tokio::test(start_paused = true)]
async fn a_probe_success_closes_and_resets_the_backoff() {
    let breaker = Breaker::new(&config()).unwrap();
    fail(&breaker, 3);
    advance(Duration::from_secs(10)).await;
    breaker.admit().unwrap().record(false); // re-open for 20 s
    advance(Duration::from_secs(20)).await;
    breaker.admit().unwrap().record(true);
    assert_eq!(breaker.state(), BreakerState::Closed);
    // Counts were reset: it takes three fresh failures, and the open time is back to 10 s.
    fail(&breaker, 2);
    assert_eq!(breaker.state(), BreakerState::Closed);
    fail(&breaker, 1);
    advance(Duration::from_secs(10)).await;
    assert!(breaker.admit().is_some());
}

#[tokio::test(start_paused = true)]
async fn a_probe_failure_reopens_with_doubled_time_capped_at_max() {
    let breaker = Breaker::new(&config()).unwrap();
    fail(&breaker, 3);
    // Open times: 10 s, then 20 s, then 35 s (40 capped), then 35 s.
    for open_for in [10, 20, 35, 35] {
        advance(Duration::from_secs(open_for) - Duration::from_millis(1)).await;
        assert!(breaker.admit().is_none(), "still open before {open_for}s");
        advance(Duration::from_millis(1)).await;
        let probe = breaker.admit().expect("probe after open time");
        assert!(probe.is_probe());
        probe.record(false);
        assert_eq!(breaker.state(), BreakerState::Open);
    }
    assert_eq!(breaker.opened_total(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_frees_its_slot() {
    let breaker = Breaker::new(&config()).unwrap();
    fail(&breaker, 3);
    advance(Duration::from_secs(10)).await;
    let probe = breaker.admit().unwrap();
    assert!(breaker.admit().is_none());
    drop(probe);
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    let probe = breaker.admit().expect("slot freed");
    probe.record(true);
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn dropped_admissions_are_neutral_while_closed() {
    let breaker = Breaker::new(&config()).unwrap();
    fail(&breaker, 2);
    for _ in 0..10 {
        drop(breaker.admit().unwrap());
    }
    fail(&breaker, 1);
    assert_eq!(
        breaker.state(),
        BreakerState::Open,
        "drops did not reset the count"
    );
}

#[tokio::test(start_paused = true)]
async fn stale_results_are_ignored() {
    let breaker = Breaker::new(&config()).unwrap();
    let slow = breaker.admit().unwrap(); // started while closed
    fail(&breaker, 3);
    advance(Duration::from_secs(10)).await;
    let probe = breaker.admit().unwrap();
    // The slow request succeeding must not close the breaker on the probe's behalf...
    slow.record(true);
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    probe.record(true);
    assert_eq!(breaker.state(), BreakerState::Closed);
    // ...and a stale probe from an earlier half-open period cannot re-open it.
    fail(&breaker, 3);
    advance(Duration::from_secs(10)).await;
    let old_probe = breaker.admit().unwrap();
    drop(old_probe);
    breaker.admit().unwrap().record(true);
    assert_eq!(breaker.state(), BreakerState::Closed);
}

fn rate_config() -> BreakerConfig {
    BreakerConfig {
        consecutive_failures: None,
        failure_rate: Some(0.5),
        min_requests: 10,
        ..config()
    }
}

#[tokio::test(start_paused = true)]
async fn rate_rule_waits_for_min_requests() {
    let breaker = Breaker::new(&rate_config()).unwrap();
    // 9 failures in a row: 100% failure rate, but below min_requests.
    fail(&breaker, 9);
    assert_eq!(breaker.state(), BreakerState::Closed);
    fail(&breaker, 1);
    assert_eq!(breaker.state(), BreakerState::Open);
}

#[tokio::test(start_paused = true)]
async fn rate_rule_opens_at_the_threshold_not_below() {
    let breaker = Breaker::new(&rate_config()).unwrap();
    // Alternate: success, failure ... 49% then 50%.
    succeed(&breaker, 11);
    fail(&breaker, 10);
    assert_eq!(breaker.state(), BreakerState::Closed, "10/21 < 50%");
    fail(&breaker, 1);
    assert_eq!(breaker.state(), BreakerState::Open, "11/22 = 50%");
}

#[tokio::test(start_paused = true)]
async fn rate_rule_forgets_results_outside_the_window() {
    let breaker = Breaker::new(&rate_config()).unwrap();
    fail(&breaker, 9);
    advance(Duration::from_secs(11)).await;
    fail(&breaker, 9);
    assert_eq!(
        breaker.state(),
        BreakerState::Closed,
        "old failures expired"
    );
    fail(&breaker, 1);
    assert_eq!(breaker.state(), BreakerState::Open);
}

#[test]
fn invalid_configs_are_refused() {
    let bad = [
        BreakerConfig {
            consecutive_failures: Some(0),
            ..config()
        },
        BreakerConfig {
            failure_rate: Some(1.5),
            ..config()
        },
        BreakerConfig {
            failure_rate: Some(f64::NAN),
            ..config()
        },
        BreakerConfig {
            open_for: Duration::ZERO,
            ..config()
        },
        BreakerConfig {
            max_open_for: Duration::from_secs(1),
            ..config()
        },
        BreakerConfig {
            half_open_requests: 0,
            ..config()
        },
    ];
    for config in bad {
        assert!(Breaker::new(&config).is_err(), "{config:?}");
    }
    assert!(Breaker::new(&BreakerConfig::default()).is_ok());
}

#[test]
fn concurrent_probes_never_exceed_the_limit() {
    let breaker = Breaker::new(&BreakerConfig {
        half_open_requests: 4,
        open_for: Duration::from_millis(1),
        ..config()
    })
    .unwrap();
    fail(&breaker, 3);
    std::thread::sleep(Duration::from_millis(5));
    let admitted = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let b = breaker.clone();
                s.spawn(move || (0..100).filter_map(|_| b.admit()).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(admitted.iter().map(Vec::len).sum::<usize>(), 4);
}
