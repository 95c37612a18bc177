//! The broker's topic table, persisted atomically in `topics.json`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use txmq_protocol::{ErrorCode, TopicConfig, WireError};

#[derive(Serialize, Deserialize)]
struct Persisted {
    name: String,
    queues: u32,
    perm: u8,
}

/// Topic name -> configuration.
#[derive(Debug)]
pub struct TopicTable {
    path: PathBuf,
    topics: Mutex<BTreeMap<String, TopicConfig>>,
}

impl TopicTable {
    /// Loads `topics.json` from `dir` (empty when missing).
    ///
    /// # Errors
    /// An unreadable or damaged file.
    pub fn load(dir: &Path) -> Result<TopicTable, String> {
        let path = dir.join("topics.json");
        let mut topics = BTreeMap::new();
        match std::fs::read(&path) {
            Ok(data) => {
                let list: Vec<Persisted> = serde_json::from_slice(&data)
                    .map_err(|e| format!("topic table {} is damaged: {e}", path.display()))?;
                for t in list {
                    topics.insert(
                        t.name.clone(),
                        TopicConfig {
                            name: t.name,
                            queues: t.queues,
                            perm: t.perm,
                        },
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        Ok(TopicTable {
            path,
            topics: Mutex::new(topics),
        })
    }

    /// A topic's configuration.
    pub fn get(&self, name: &str) -> Option<TopicConfig> {
        self.lock().get(name).cloned()
    }

    /// `f` of a topic's configuration, without copying it (every send
    /// looks its topic up). `f` runs under the table's lock: it must be
    /// short and must not use the table.
    pub fn get_with<R>(&self, name: &str, f: impl FnOnce(&TopicConfig) -> R) -> Option<R> {
        self.lock().get(name).map(f)
    }

    /// Every topic.
    pub fn all(&self) -> Vec<TopicConfig> {
        self.lock().values().cloned().collect()
    }

    /// Inserts or replaces a topic and persists the table before returning.
    /// Returns the stored configuration. `merge` decides, given the existing
    /// configuration if any and the number of topics of the same kind (a
    /// consumer group's `%RETRY%`/`%DLQ%` topics, or the others), what to
    /// store.
    ///
    /// # Errors
    /// The error from `merge`, or an I/O error persisting the table
    /// (`STORE_UNAVAILABLE`; `STORE_FULL` when the disk is full).
    pub fn upsert(
        &self,
        name: &str,
        merge: impl FnOnce(Option<&TopicConfig>, usize) -> Result<TopicConfig, WireError>,
    ) -> Result<(TopicConfig, bool), WireError> {
        let mut topics = self.lock();
        let existing = topics.get(name);
        // Consumer groups' retry and dead-letter topics are counted apart
        // from the others (each kind has its own bound).
        let kind = is_group_topic(name);
        let same_kind = topics.keys().filter(|t| is_group_topic(t) == kind).count();
        let new = merge(existing, same_kind)?;
        if existing == Some(&new) {
            return Ok((new, false));
        }
        let mut next = topics.clone();
        next.insert(name.to_string(), new.clone());
        self.persist(&next)?;
        *topics = next;
        Ok((new, true))
    }

    /// Removes a topic and persists the table before returning; returns
    /// its configuration, `None` when there was no such topic.
    ///
    /// # Errors
    /// An I/O error persisting the table (`STORE_UNAVAILABLE`; `STORE_FULL`
    /// when the disk is full).
    pub fn remove(&self, name: &str) -> Result<Option<TopicConfig>, WireError> {
        let mut topics = self.lock();
        if !topics.contains_key(name) {
            return Ok(None);
        }
        let mut next = topics.clone();
        let old = next.remove(name);
        self.persist(&next)?;
        *topics = next;
        Ok(old)
    }

    fn persist(&self, topics: &BTreeMap<String, TopicConfig>) -> Result<(), WireError> {
        let list: Vec<Persisted> = topics
            .values()
            .map(|t| Persisted {
                name: t.name.clone(),
                queues: t.queues,
                perm: t.perm,
            })
            .collect();
        let data = serde_json::to_vec_pretty(&list)
            .map_err(|e| WireError::new(ErrorCode::StoreUnavailable, e.to_string()))?;
        let tmp = self.path.with_extension("json.tmp");
        let io = |e: std::io::Error| {
            let (code, full) = match crate::store::no_space(&e) {
                true => (
                    ErrorCode::StoreFull,
                    ": the disk holding the data dir is full; free space on it",
                ),
                false => (ErrorCode::StoreUnavailable, ""),
            };
            WireError::new(
                code,
                format!("cannot write {}: {e}{full}", self.path.display()),
            )
        };
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(&data).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            crate::store::commit_log::sync_dir(dir).map_err(io)?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, TopicConfig>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A consumer group's retry or dead-letter topic (made by the broker).
pub(crate) fn is_group_topic(name: &str) -> bool {
    name.starts_with(txmq_protocol::RETRY_TOPIC_PREFIX)
        || name.starts_with(txmq_protocol::DLQ_TOPIC_PREFIX)
}
