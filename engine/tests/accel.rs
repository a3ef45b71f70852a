//! The accelerator probe against real QEMU: a probe guest boots under TCG (jailed like a VM),
//! the watchdog catches a guest that does not come up, and `auto` caches its verdict per host
//! and probe kernel. The test image's kernel stands for the host's trusted probe kernel.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use engine::host::accel::{decide, probe_boot, Decision, ProbeOutcome, ProbeSpec};
use engine::Accelerator;
use image_manager::Lease;
use schemas::config::Accel;

mod common;
use common::Fixture;

/// An engine fixture holding a lease on the minimal image, whose kernel the probe boots.
struct Probe {
    fixture: Fixture,
    lease: Lease,
}

impl Probe {
    fn new() -> Probe {
        let fixture = Fixture::new();
        let lease = fixture.lease();
        Probe { fixture, lease }
    }

    fn spec(&self, watchdog: Duration) -> ProbeSpec {
        self.fixture.probe_spec(&self.lease, watchdog)
    }

    fn scratch(&self) -> &std::path::Path {
        self.fixture.scratch.path()
    }

    fn probe_dir_is_empty(&self) -> bool {
        std::fs::read_dir(self.scratch().join("probe"))
            .map(|entries| entries.count() == 0)
            .unwrap_or(true)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_probe_guest_boots_under_tcg() {
    let fixture = Probe::new();
    let outcome = probe_boot(Accelerator::Tcg, &fixture.spec(Duration::from_secs(60))).await;
    assert!(
        matches!(outcome, ProbeOutcome::Booted { .. }),
        "{outcome:?}"
    );
    assert!(fixture.probe_dir_is_empty(), "the probe cleans up");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_watchdog_calls_a_guest_that_does_not_come_up_in_time_hung() {
    let fixture = Probe::new();
    // Under TCG the kernel needs about a second; 200 ms is a hang by this watchdog.
    let outcome = probe_boot(Accelerator::Tcg, &fixture.spec(Duration::from_millis(200))).await;
    assert_eq!(outcome, ProbeOutcome::Hung);
    assert!(
        fixture.probe_dir_is_empty(),
        "the hung probe is killed and removed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_qemu_that_cannot_run_the_probe_is_a_failure_with_its_reason() {
    let fixture = Probe::new();
    let mut spec = fixture.spec(Duration::from_secs(30));
    spec.kernel = fixture.scratch().join("no-such-kernel");
    let outcome = probe_boot(Accelerator::Tcg, &spec).await;
    match outcome {
        ProbeOutcome::Failed { reason } => assert!(reason.contains("no-such-kernel"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_probes_once_per_host_and_reuses_the_cached_verdict() {
    let fixture = Probe::new();
    let cache = fixture.scratch().join("state/accel.json");
    let spec = fixture.spec(Duration::from_secs(10));
    let first = decide(Accel::Auto, &cache, Some(&spec)).await;
    if first.accelerator == Accelerator::Tcg {
        let notice = first
            .notice
            .as_deref()
            .expect("falling back to TCG is announced");
        assert!(!notice.contains('\n'), "one line: {notice}");
    }
    let mut verdict: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cache).expect("the verdict is stored")).unwrap();

    // A stored verdict for this host is used as it is, without a new probe.
    verdict["kvm_usable"] = false.into();
    verdict["reason"] = "recorded-earlier".into();
    std::fs::write(&cache, serde_json::to_vec(&verdict).unwrap()).unwrap();
    let second = decide(Accel::Auto, &cache, Some(&spec)).await;
    assert_eq!(second.accelerator, Accelerator::Tcg);
    assert!(second.notice.unwrap().contains("recorded-earlier"));

    // A verdict from another host is not.
    verdict["host"] = "another host".into();
    std::fs::write(&cache, serde_json::to_vec(&verdict).unwrap()).unwrap();
    let third = decide(Accel::Auto, &cache, Some(&spec)).await;
    assert_eq!(third.accelerator, first.accelerator);
    assert!(!third
        .notice
        .unwrap_or_default()
        .contains("recorded-earlier"));
}

#[tokio::test(flavor = "multi_thread")]
async fn forced_choices_never_probe() {
    let fixture = Probe::new();
    let cache = fixture.scratch().join("state/accel.json");
    for (choice, accelerator) in [
        (Accel::Kvm, Accelerator::Kvm),
        (Accel::Tcg, Accelerator::Tcg),
    ] {
        assert_eq!(
            decide(choice, &cache, None).await,
            Decision {
                accelerator,
                notice: None
            }
        );
    }
    assert!(!cache.exists());
}

/// The verdict decides every later task's accelerator, so only a verdict this process could
/// have written for this probe kernel is believed: not one another user may write, not one
/// behind a link, not one made with another kernel (e.g. a task's, as earlier versions did).
#[tokio::test(flavor = "multi_thread")]
async fn a_verdict_that_could_have_been_poisoned_is_not_believed() {
    let fixture = Probe::new();
    let state = fixture.scratch().join("state");
    let cache = state.join("accel.json");
    let spec = fixture.spec(Duration::from_secs(10));
    decide(Accel::Auto, &cache, Some(&spec)).await;
    let mut verdict: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cache).unwrap()).unwrap();
    assert!(
        verdict["host"].as_str().unwrap().contains("kernel sha256:"),
        "the key names the probe kernel: {verdict}"
    );
    verdict["kvm_usable"] = false.into();
    verdict["reason"] = "poisoned".into();
    let poisoned = serde_json::to_vec(&verdict).unwrap();
    let believed = |decision: Decision| {
        decision
            .notice
            .is_some_and(|notice| notice.contains("poisoned"))
    };

    // Written by this user, 0644: believed (the control).
    std::fs::write(&cache, &poisoned).unwrap();
    assert!(believed(decide(Accel::Auto, &cache, Some(&spec)).await));

    // Writable by others: not believed, probed again and replaced.
    std::fs::write(&cache, &poisoned).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert!(!believed(decide(Accel::Auto, &cache, Some(&spec)).await));
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "the new verdict is written afresh");

    // Behind a link: not believed.
    let elsewhere = state.join("elsewhere.json");
    std::fs::write(&elsewhere, &poisoned).unwrap();
    std::fs::remove_file(&cache).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &cache).unwrap();
    assert!(!believed(decide(Accel::Auto, &cache, Some(&spec)).await));

    // Made with another kernel (a task's image, say): not believed.
    std::fs::remove_file(&cache).unwrap();
    let mut verdict_of_other = verdict.clone();
    verdict_of_other["host"] = verdict["host"]
        .as_str()
        .unwrap()
        .replace("kernel sha256:", "kernel sha256:0")
        .into();
    std::fs::write(&cache, serde_json::to_vec(&verdict_of_other).unwrap()).unwrap();
    assert!(!believed(decide(Accel::Auto, &cache, Some(&spec)).await));
}
