//! Arbitrary bytes as the only commit-log segment of a data dir: opening
//! the store (recovery) must finish without panicking, serve only records
//! that pass their checksum, take a new append, and open again afterwards.
//! Slow (a temp dir and fsyncs per run): give it `-timeout=10`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use txmq_broker::store::record::{check, Check};
use txmq_broker::store::{Store, StoreConfig};
use txmq_protocol::Message;

const SEGMENT: u64 = 64 * 1024;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fn config(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_size = SEGMENT;
    c.max_message_size = 16 * 1024;
    c
}

fn served(store: &Store) -> Vec<(String, u32, u64, u64)> {
    let mut out = Vec::new();
    for (topic, queues) in store.topics() {
        for q in 0..queues {
            let mut offset = 0;
            loop {
                let r = store.read(&topic, q, offset, 64, 1 << 20).expect("read");
                if r.next_offset == offset && r.messages.is_empty() {
                    break;
                }
                for m in r.messages {
                    out.push((topic.clone(), q, m.queue_offset, m.log_offset));
                }
                offset = r.next_offset;
            }
        }
    }
    out.sort();
    out
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("commitlog");
    std::fs::create_dir_all(&log).unwrap();
    let data = &data[..data.len().min(SEGMENT as usize)];
    std::fs::write(log.join(format!("{:020}", 0)), data).unwrap();

    let Ok(store) = Store::open(config(dir.path()), &[("t".into(), 1)]) else {
        return; // a clear refusal is an answer too
    };
    let first = served(&store);
    for (_, _, _, pos) in &first {
        let bytes = &data.get(*pos as usize..).unwrap_or(&[]);
        assert!(
            matches!(check(bytes), Check::Valid(_)),
            "served a bad record at {pos}"
        );
    }
    let appended = runtime().block_on(store.append("t", 0, vec![Message::new("t", "after")]));
    runtime().block_on(store.shutdown());
    let store = Store::open(config(dir.path()), &[("t".into(), 1)]).expect("reopens");
    let second = served(&store);
    let grew = usize::from(appended.is_ok());
    assert_eq!(
        second.len(),
        first.len() + grew,
        "{first:?} then {second:?}"
    );
    runtime().block_on(store.shutdown());
});
