//! Live reload of a file-backed value (the policy): on SIGHUP, or when the file's mtime or
//! size changes, the file is loaded again and, if valid, swapped in atomically. Requests
//! already in flight keep the value they started with; an invalid file keeps the old value
//! and says why.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, SignalKind};

/// How often the file's metadata is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// What identifies a version of the file: modification time and size.
pub type Stamp = Option<(SystemTime, u64)>;

/// Take this *before* loading the value that `watch` starts from, so that a change made
/// between the load and the watcher's start is still seen.
pub fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Watches `path` until the task is dropped. `load` builds a new value from the file;
/// `on_swap` runs after each successful swap (for example to update kernel maps).
pub async fn watch<T, E>(
    path: PathBuf,
    loaded: Stamp,
    current: Arc<ArcSwap<T>>,
    load: impl Fn(&Path) -> Result<T, E> + Send + 'static,
    on_swap: impl Fn(&T) + Send + 'static,
) where
    T: Send + Sync + 'static,
    E: std::error::Error + 'static,
{
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload on file change only");
            return watch_changes_only(path, loaded, current, load, on_swap).await;
        }
    };
    let mut last = loaded;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        let why = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            _ = tick.tick() => {
                let now = stamp(&path);
                if now == last { continue; }
                last = now;
                "file changed"
            }
        };
        reload(&path, &current, &load, &on_swap, why);
    }
}

async fn watch_changes_only<T, E>(
    path: PathBuf,
    loaded: Stamp,
    current: Arc<ArcSwap<T>>,
    load: impl Fn(&Path) -> Result<T, E>,
    on_swap: impl Fn(&T),
) where
    E: std::error::Error + 'static,
{
    let mut last = loaded;
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        let now = stamp(&path);
        if now != last {
            last = now;
            reload(&path, &current, &load, &on_swap, "file changed");
        }
    }
}

fn reload<T, E: std::error::Error + 'static>(
    path: &Path,
    current: &ArcSwap<T>,
    load: &impl Fn(&Path) -> Result<T, E>,
    on_swap: &impl Fn(&T),
    why: &str,
) {
    match load(path) {
        Ok(v) => {
            let v = Arc::new(v);
            on_swap(&v);
            current.store(v);
            tracing::info!(path = %path.display(), trigger = why, "policy reloaded");
        }
        Err(e) => tracing::error!(
            path = %path.display(),
            trigger = why,
            error = %crate::error_chain(&e),
            "policy reload failed; keeping the previous policy"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("bad number")]
    struct Bad;

    fn parse(p: &Path) -> Result<u32, Bad> {
        std::fs::read_to_string(p)
            .map_err(|_| Bad)?
            .trim()
            .parse()
            .map_err(|_| Bad)
    }

    #[tokio::test]
    async fn swaps_on_change_and_keeps_the_old_value_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v");
        std::fs::write(&p, "1").unwrap();
        let loaded = stamp(&p);
        let cur = Arc::new(ArcSwap::from_pointee(parse(&p).unwrap()));
        let task = tokio::spawn(watch(p.clone(), loaded, cur.clone(), parse, |_| {}));
        let wait_for = |want: u32| {
            let cur = cur.clone();
            async move {
                for _ in 0..100 {
                    if **cur.load() == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                panic!("value never became {want}, is {}", cur.load());
            }
        };
        // Sizes differ so that the change is seen even within one mtime tick.
        std::fs::write(&p, "22").unwrap();
        wait_for(22).await;
        std::fs::write(&p, "not a number").unwrap();
        tokio::time::sleep(POLL_INTERVAL * 3).await;
        assert_eq!(**cur.load(), 22, "an invalid file keeps the previous value");
        std::fs::write(&p, "333").unwrap();
        wait_for(333).await;
        task.abort();
    }
}
