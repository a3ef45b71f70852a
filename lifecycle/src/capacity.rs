//! What the host can hold at once: memory and CPUs handed out to task VMs, first come first
//! served. A task reserves its resolved machine before its VM starts and gives it back when
//! the reservation drops.

use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::sync::Notify;

/// Memory and CPUs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub cpus: u64,
}

/// A machine that can never fit.
#[derive(Debug, Error)]
#[error(
    "the machine needs {} MiB and {} vCPU(s), more than this host's whole capacity ({} MiB, \
     {} vCPU(s))",
    needed.memory_mib, needed.cpus, total.memory_mib, total.cpus
)]
pub struct TooBig {
    /// What the task asked for.
    pub needed: Resources,
    /// What the host has in all.
    pub total: Resources,
}

/// The host's capacity, shared by all tasks of a worker.
#[derive(Debug)]
pub struct Capacity {
    total: Resources,
    used: Mutex<Resources>,
    /// Waiters take turns in arrival order (tokio's mutex is fair): FIFO admission.
    turn: tokio::sync::Mutex<()>,
    freed: Notify,
}

impl Capacity {
    /// A host that holds `total` at once.
    pub fn new(total: Resources) -> Arc<Capacity> {
        Arc::new(Capacity {
            total,
            used: Mutex::new(Resources {
                memory_mib: 0,
                cpus: 0,
            }),
            turn: tokio::sync::Mutex::new(()),
            freed: Notify::new(),
        })
    }

    /// The whole capacity.
    pub fn total(&self) -> Resources {
        self.total
    }

    /// What running tasks hold now.
    pub fn used(&self) -> Resources {
        *self
            .used
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits until `needed` fits beside what runs, in arrival order, and reserves it.
    pub async fn reserve(self: &Arc<Self>, needed: Resources) -> Result<Reservation, TooBig> {
        if needed.memory_mib > self.total.memory_mib || needed.cpus > self.total.cpus {
            return Err(TooBig {
                needed,
                total: self.total,
            });
        }
        let _turn = self.turn.lock().await;
        loop {
            // Registered before the check, so a release between the two is not missed.
            let freed = self.freed.notified();
            if self.try_take(needed) {
                return Ok(Reservation {
                    capacity: self.clone(),
                    held: needed,
                });
            }
            freed.await;
        }
    }

    fn try_take(&self, needed: Resources) -> bool {
        let mut used = self
            .used
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let fits = used.memory_mib + needed.memory_mib <= self.total.memory_mib
            && used.cpus + needed.cpus <= self.total.cpus;
        if fits {
            used.memory_mib += needed.memory_mib;
            used.cpus += needed.cpus;
        }
        fits
    }
}

/// Resources held by one task; released on drop.
#[derive(Debug)]
pub struct Reservation {
    capacity: Arc<Capacity>,
    held: Resources,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        {
            let mut used = self
                .capacity
                .used
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            used.memory_mib -= self.held.memory_mib;
            used.cpus -= self.held.cpus;
        }
        self.capacity.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn res(memory_mib: u64, cpus: u64) -> Resources {
        Resources { memory_mib, cpus }
    }

    #[tokio::test]
    async fn a_task_waits_until_the_memory_it_needs_is_given_back() {
        let capacity = Capacity::new(res(1024, 4));
        let first = capacity.reserve(res(768, 1)).await.unwrap();
        let waiting = {
            let capacity = capacity.clone();
            tokio::spawn(async move { capacity.reserve(res(512, 1)).await.map(|_| ()) })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "512 MiB fit beside 768 of 1024");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("admitted once freed")
            .unwrap()
            .unwrap();
        assert_eq!(capacity.used(), res(0, 0));
    }

    #[tokio::test]
    async fn cpus_are_counted_too_and_admission_is_first_come_first_served() {
        let capacity = Capacity::new(res(100_000, 2));
        let held = capacity.reserve(res(1, 2)).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for index in 0..3 {
            let capacity = capacity.clone();
            let order = order.clone();
            waiters.push(tokio::spawn(async move {
                let reservation = capacity.reserve(res(1, 2)).await.unwrap();
                order.lock().unwrap().push(index);
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(reservation);
            }));
            // Each waiter queues before the next one is spawned.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(order.lock().unwrap().is_empty());
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn a_machine_larger_than_the_host_is_refused_at_once() {
        let capacity = Capacity::new(res(1024, 2));
        let error = capacity.reserve(res(2048, 1)).await.unwrap_err();
        assert!(error.to_string().contains("2048 MiB"), "{error}");
    }
}
