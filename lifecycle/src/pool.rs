//! The warm pool (`warmPool` in the configuration, 0 by default): up to N VMs restored from the
//! snapshot of the most used image and machine, warmed up and left paused — no CPU, only their
//! resident memory — so that a task of that key starts with a `cont` instead of a restore. A
//! taken VM is replaced in the background. Pooled VMs are ordinary `VirtualMachine`s: their
//! network, records and directories are their own, and dropping the pool (the worker ending)
//! kills them.
//!
//! Warming up: before it is paused, a pooled VM's agent runs the engine's warm-up command
//! ([`engine::network::warm_up::WARM_UP_COMMAND`]), so the code a task's first command runs —
//! the agent's spawn path, the shell, the loader, the C library, a few tools — has run in that
//! QEMU already. Under TCG a restored VM otherwise translates all of it during the task's first
//! command.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use engine::network::warm_up::{WarmUp, WarmUpState, WARM_UP_TIMEOUT};
use engine::snapshot::Snapshot;
use engine::{VirtualMachine, VmSettings};
use image_manager::{Cache, Digest};
use schemas::ResolvedMachine;

/// What a refill needs to make one more VM of a key.
#[derive(Clone)]
pub struct Recipe {
    /// The image.
    pub image: Digest,
    /// The snapshot to restore.
    pub snapshot: Snapshot,
    /// The resolved machine.
    pub machine: ResolvedMachine,
    /// The VM settings (the name is replaced per VM).
    pub settings: VmSettings,
}

/// A paused VM of the pool, and its warm-up (whose handler holds the agent's request for its
/// task until the VM is taken).
pub struct Pooled {
    /// The VM, paused.
    pub vm: VirtualMachine,
    /// Its warm-up: [`WarmUp::hand_over`] the VM to its task once the task's handler is set.
    pub warm_up: Arc<WarmUp>,
    /// Whether the warm-up ran (an older agent, or one too slow, has none).
    pub warmed: bool,
}

/// The pool.
pub struct WarmPool {
    size: usize,
    cache: Cache,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Paused VMs, all of one key (the most used).
    ready: Vec<Pooled>,
    /// The key the ready VMs are of, and how to make more.
    key: Option<(String, Recipe)>,
    /// Tasks started per key.
    usage: HashMap<String, u64>,
    /// Refills under way.
    refilling: usize,
    serial: u64,
}

impl WarmPool {
    /// A pool of at most `size` VMs (0: none) of images in `cache`.
    pub fn new(size: u32, cache: Cache) -> WarmPool {
        WarmPool {
            size: size as usize,
            cache,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Whether the pool keeps VMs at all.
    pub fn enabled(&self) -> bool {
        self.size > 0
    }

    /// A paused VM of `key`, if one is ready (the caller sets its handler, hands its warm-up
    /// over and resumes it); counts the use, and starts making its replacement.
    pub fn take(self: &Arc<Self>, key: &str) -> Option<Pooled> {
        let vm = {
            let mut inner = self.inner.lock().ok()?;
            *inner.usage.entry(key.to_owned()).or_default() += 1;
            match &inner.key {
                Some((current, _)) if current == key => inner.ready.pop(),
                _ => None,
            }
        };
        if vm.is_some() {
            self.top_up();
        }
        vm
    }

    /// Tells the pool how to make VMs of `key` (after a task of it started otherwise); when
    /// `key` is the most used, the pool serves it from now on and fills up.
    pub fn offer(self: &Arc<Self>, key: &str, recipe: &Recipe) {
        {
            let Ok(mut inner) = self.inner.lock() else {
                return;
            };
            let uses = inner.usage.get(key).copied().unwrap_or(0);
            let leader = inner.usage.values().copied().max().unwrap_or(0);
            if uses < leader {
                return;
            }
            if inner.key.as_ref().map(|(k, _)| k.as_str()) != Some(key) {
                inner.ready.clear(); // dropping them kills them
                inner.key = Some((key.to_owned(), recipe.clone()));
            }
        }
        self.top_up();
    }

    /// Paused VMs ready now.
    pub fn ready(&self) -> usize {
        self.inner.lock().map_or(0, |inner| inner.ready.len())
    }

    /// QEMU's process ids of the pooled VMs.
    pub fn pids(&self) -> Vec<u32> {
        self.inner
            .lock()
            .map(|inner| inner.ready.iter().map(|pooled| pooled.vm.pid()).collect())
            .unwrap_or_default()
    }

    /// QEMU's resident memory over all pooled VMs, in bytes (the pool's cost).
    pub fn resident_bytes(&self) -> u64 {
        self.pids()
            .into_iter()
            .map(engine::host::procfs::resident_bytes)
            .sum()
    }

    /// Starts restoring VMs of the current key until the pool is full.
    fn top_up(self: &Arc<Self>) {
        let (wanted, key, recipe) = {
            let Ok(mut inner) = self.inner.lock() else {
                return;
            };
            let Some((key, recipe)) = inner.key.clone() else {
                return;
            };
            let wanted = self
                .size
                .saturating_sub(inner.ready.len() + inner.refilling);
            inner.refilling += wanted;
            (wanted, key, recipe)
        };
        for _ in 0..wanted {
            let pool = self.clone();
            let (key, recipe) = (key.clone(), recipe.clone());
            tokio::spawn(async move {
                let settings = VmSettings {
                    name: pool.next_name(&recipe.settings.name),
                    ..recipe.settings.clone()
                };
                let vm = match pool.cache.lease(&recipe.image) {
                    Ok(Some(lease)) => VirtualMachine::restore_paused(
                        lease,
                        &recipe.machine,
                        &settings,
                        &recipe.snapshot,
                    )
                    .await
                    .ok(),
                    _ => None,
                };
                let pooled = match vm {
                    Some(vm) => warm_up(vm).await,
                    None => None,
                };
                if let Ok(mut inner) = pool.inner.lock() {
                    inner.refilling = inner.refilling.saturating_sub(1);
                    let current = inner.key.as_ref().map(|(k, _)| k.as_str()) == Some(key.as_str());
                    if let Some(pooled) =
                        pooled.filter(|_| current && inner.ready.len() < pool.size)
                    {
                        inner.ready.push(pooled);
                    }
                }
            });
        }
    }

    fn next_name(&self, base: &str) -> String {
        let serial = self
            .inner
            .lock()
            .map(|mut inner| {
                inner.serial += 1;
                inner.serial
            })
            .unwrap_or_default();
        format!("{base}-pool{serial}")
    }
}

/// Runs the standard warm-up in `vm` (restored, paused) and pauses it again; None when it
/// cannot be paused (it is dropped, which kills it).
async fn warm_up(vm: VirtualMachine) -> Option<Pooled> {
    let warm_up = WarmUp::standard();
    vm.set_http_handler(warm_up.handler());
    vm.resume().await.ok()?;
    let finished = tokio::time::timeout(WARM_UP_TIMEOUT, warm_up.finished()).await;
    vm.suspend().await.ok()?;
    Some(Pooled {
        vm,
        warmed: finished == Ok(WarmUpState::Done),
        warm_up,
    })
}
