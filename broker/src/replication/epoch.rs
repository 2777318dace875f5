//! The epoch history: which master epoch wrote which part of the commit log.
//!
//! Every broker keeps an ordered list of `(epoch, start_offset)` entries in
//! `<data_dir>/epochs.json`. A promotion appends `(e + 1, end of log)`; a
//! slave appends an entry whenever the replication stream crosses into a new
//! epoch. Two brokers agree on every byte up to the *fork point* computed by
//! [`fork_point`] from their two histories; a returning old master truncates
//! its log there before following the new master.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::persist_atomically;

/// One epoch of the history: the epoch number and the commit-log offset at
/// which the first record written under it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochEntry {
    pub epoch: u64,
    pub start_offset: u64,
}

/// Errors changing the epoch history.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    #[error("epoch {new} is not newer than the last known epoch {last}")]
    NotNewer { new: u64, last: u64 },
    #[error(
        "epoch {epoch} cannot start at offset {start}: epoch {last_epoch} already starts at {last_start}"
    )]
    StartsBeforePrevious {
        epoch: u64,
        start: u64,
        last_epoch: u64,
        last_start: u64,
    },
    #[error("epoch file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("epoch file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The ordered epoch history of one broker.
///
/// Invariants: epochs strictly increase; start offsets never decrease.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochHistory {
    entries: Vec<EpochEntry>,
}

impl EpochHistory {
    /// Builds a history from entries, checking the invariants.
    pub fn from_entries(entries: Vec<EpochEntry>) -> Result<Self, String> {
        for w in entries.windows(2) {
            if w[1].epoch <= w[0].epoch {
                return Err(format!(
                    "epochs must increase: {} follows {}",
                    w[1].epoch, w[0].epoch
                ));
            }
            if w[1].start_offset < w[0].start_offset {
                return Err(format!(
                    "epoch {} starts at {}, before epoch {} at {}",
                    w[1].epoch, w[1].start_offset, w[0].epoch, w[0].start_offset
                ));
            }
        }
        Ok(Self { entries })
    }

    pub fn entries(&self) -> &[EpochEntry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn last(&self) -> Option<EpochEntry> {
        self.entries.last().copied()
    }

    /// The newest epoch, or 0 when the history is empty.
    pub fn last_epoch(&self) -> u64 {
        self.last().map_or(0, |e| e.epoch)
    }

    /// Starts a new epoch at `start_offset`.
    pub fn begin(&mut self, epoch: u64, start_offset: u64) -> Result<(), EpochError> {
        if let Some(last) = self.last() {
            if epoch <= last.epoch {
                return Err(EpochError::NotNewer {
                    new: epoch,
                    last: last.epoch,
                });
            }
            if start_offset < last.start_offset {
                return Err(EpochError::StartsBeforePrevious {
                    epoch,
                    start: start_offset,
                    last_epoch: last.epoch,
                    last_start: last.start_offset,
                });
            }
        }
        self.entries.push(EpochEntry {
            epoch,
            start_offset,
        });
        Ok(())
    }

    /// The epoch that wrote the byte at `offset`, if the history covers it.
    pub fn epoch_at(&self, offset: u64) -> Option<u64> {
        self.entries
            .iter()
            .rev()
            .find(|e| e.start_offset <= offset)
            .map(|e| e.epoch)
    }

    /// Where the epoch after the one containing `offset` starts, if any:
    /// replication batches must not cross that boundary.
    pub fn next_epoch_start_after(&self, offset: u64) -> Option<u64> {
        self.entries
            .iter()
            .find(|e| e.start_offset > offset)
            .map(|e| e.start_offset)
    }

    /// Drops every epoch that has no record below `offset`, after the log was
    /// truncated to `offset`.
    pub fn truncate_to(&mut self, offset: u64) {
        self.entries.retain(|e| e.start_offset < offset);
    }

    /// Loads the history from `path`; a missing file is an empty history.
    pub fn load(path: &Path) -> Result<Self, EpochError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(EpochError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let file: EpochFile = serde_json::from_slice(&bytes).map_err(|e| EpochError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::from_entries(file.epochs).map_err(|reason| EpochError::Invalid {
            path: path.to_owned(),
            reason,
        })
    }

    /// Writes the history to `path` atomically (temp file, fsync, rename,
    /// fsync of the directory).
    pub fn save(&self, path: &Path) -> Result<(), EpochError> {
        let file = EpochFile {
            epochs: self.entries.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| EpochError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        persist_atomically(path, &bytes).map_err(|source| EpochError::Io {
            path: path.to_owned(),
            source,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct EpochFile {
    epochs: Vec<EpochEntry>,
}

/// The end (exclusive) of epoch `index` in a history whose log ends at
/// `log_end`: the start of the next epoch, or the log end for the last one.
fn epoch_end(entries: &[EpochEntry], index: usize, log_end: u64) -> u64 {
    entries
        .get(index + 1)
        .map_or(log_end, |next| next.start_offset)
        .min(log_end)
}

/// The offset up to which two logs are identical, judged from their epoch
/// histories and log ends.
///
/// Walks our epochs from the newest; the first one the other side has too,
/// starting at the same offset, was written by the same master, so both logs
/// agree on it up to where the shorter of the two copies of that epoch ends.
/// With no common epoch the logs share nothing (fork point 0).
pub fn fork_point(ours: &EpochHistory, our_end: u64, theirs: &EpochHistory, their_end: u64) -> u64 {
    for (i, e) in ours.entries.iter().enumerate().rev() {
        if let Some(j) = theirs
            .entries
            .iter()
            .position(|t| t.epoch == e.epoch && t.start_offset == e.start_offset)
        {
            let a = epoch_end(&ours.entries, i, our_end);
            let b = epoch_end(&theirs.entries, j, their_end);
            return a.min(b);
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(entries: &[(u64, u64)]) -> EpochHistory {
        EpochHistory::from_entries(
            entries
                .iter()
                .map(|&(epoch, start_offset)| EpochEntry {
                    epoch,
                    start_offset,
                })
                .collect(),
        )
        .expect("valid history")
    }

    #[test]
    fn begin_requires_a_newer_epoch_and_no_earlier_start() {
        let mut hist = h(&[(1, 0), (2, 100)]);
        assert!(matches!(
            hist.begin(2, 200),
            Err(EpochError::NotNewer { new: 2, last: 2 })
        ));
        assert!(matches!(
            hist.begin(3, 50),
            Err(EpochError::StartsBeforePrevious { .. })
        ));
        hist.begin(5, 100)
            .expect("same start is allowed (empty epoch)");
        assert_eq!(hist.last_epoch(), 5);
    }

    #[test]
    fn identical_histories_fork_at_the_shorter_end() {
        let a = h(&[(1, 0), (2, 100)]);
        assert_eq!(fork_point(&a, 300, &a, 250), 250);
        assert_eq!(fork_point(&a, 250, &a, 300), 250);
    }

    #[test]
    fn returning_old_master_forks_where_the_new_epoch_began() {
        // Old master wrote epoch 1 up to 1000; the slave had 800 of it when
        // it was promoted to epoch 2 at 800 and has written up to 900 since.
        let old = h(&[(1, 0)]);
        let new = h(&[(1, 0), (2, 800)]);
        assert_eq!(fork_point(&old, 1000, &new, 900), 800);
        assert_eq!(fork_point(&new, 900, &old, 1000), 800);
    }

    #[test]
    fn divergent_epochs_fall_back_to_the_last_common_one() {
        let a = h(&[(1, 0), (2, 400)]);
        let b = h(&[(1, 0), (3, 500)]);
        assert_eq!(fork_point(&a, 450, &b, 700), 400);
        assert_eq!(fork_point(&b, 700, &a, 450), 400);
    }

    #[test]
    fn no_common_epoch_shares_nothing() {
        assert_eq!(fork_point(&h(&[(1, 0)]), 10, &h(&[(2, 0)]), 10), 0);
        assert_eq!(
            fork_point(&EpochHistory::default(), 0, &h(&[(2, 0)]), 10),
            0
        );
    }

    #[test]
    fn empty_slave_of_a_master_forks_at_zero() {
        let master = h(&[(1, 0), (2, 800)]);
        assert_eq!(fork_point(&EpochHistory::default(), 0, &master, 900), 0);
    }

    #[test]
    fn truncation_drops_epochs_past_the_cut() {
        let mut hist = h(&[(1, 0), (2, 400), (3, 500)]);
        hist.truncate_to(450);
        assert_eq!(hist, h(&[(1, 0), (2, 400)]));
        hist.truncate_to(400);
        assert_eq!(hist, h(&[(1, 0)]));
        hist.truncate_to(0);
        assert!(hist.is_empty());
    }

    #[test]
    fn epoch_lookup_and_boundaries() {
        let hist = h(&[(1, 0), (2, 400), (3, 500)]);
        assert_eq!(hist.epoch_at(0), Some(1));
        assert_eq!(hist.epoch_at(399), Some(1));
        assert_eq!(hist.epoch_at(400), Some(2));
        assert_eq!(hist.epoch_at(10_000), Some(3));
        assert_eq!(hist.next_epoch_start_after(0), Some(400));
        assert_eq!(hist.next_epoch_start_after(450), Some(500));
        assert_eq!(hist.next_epoch_start_after(500), None);
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("epochs.json");
        assert_eq!(
            EpochHistory::load(&path).expect("missing is empty"),
            EpochHistory::default()
        );
        let hist = h(&[(1, 0), (4, 4096)]);
        hist.save(&path).expect("save");
        assert_eq!(EpochHistory::load(&path).expect("load"), hist);
        std::fs::write(
            &path,
            br#"{"epochs":[{"epoch":3,"start_offset":0},{"epoch":2,"start_offset":5}]}"#,
        )
        .expect("write");
        assert!(matches!(
            EpochHistory::load(&path),
            Err(EpochError::Invalid { .. })
        ));
    }
}
