//! The idempotent producer's bookkeeping: a producer id per broker group
//! (obtained with `InitProducer` on the first stamped request there), a
//! sequence counter per (broker group, topic, queue) for sends and one per
//! broker group for prepares, the sequences in flight, and the stamps of
//! sends whose outcome stayed unknown (so that the caller resending the
//! same message retries it with the same stamp, on the same queue).
//!
//! The broker answers a send whose stamp it has seen with the result it
//! gave the first time, as long as that batch is among the last
//! [`MAX_IN_FLIGHT_PER_QUEUE`] it stored for the (producer id, queue): so at
//! most that many stamped sends are in flight per queue, and a retry is
//! always recognised.
//!
//! All state sits behind std mutexes held for a few map operations, never
//! across an `.await`. Opening a session is single-flight per broker group
//! ([`SingleFlight`]: one request at a time, on a task of its own, whose
//! failure the callers that waited for it share).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use foldhash::HashMap;
use tokio::sync::Semaphore;
use txmq_protocol::{ErrorCode, InitProducer, MsgId, ProducerIdentity, ProducerStamp, Request};
use txmq_remoting::{Connection, Queued, Reply};

use crate::flight::{Remember, SingleFlight};
use crate::pool::ConnectionPool;

/// Stamped sends in flight per queue at most: the broker remembers the
/// results of the last 5 batches of a (producer id, queue).
pub const MAX_IN_FLIGHT_PER_QUEUE: usize = 5;

/// How many sends with an unknown outcome are remembered for a resend.
const REMEMBERED_UNKNOWN: usize = 4096;

/// How long a broker group that does not know `InitProducer` (an older
/// broker) gets plain sends before it is asked again.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks; a poisoned one is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A stamped send that found no place among its queue's sends in flight
/// (its broker does not answer them): it was not sent.
pub(crate) fn no_place(
    kind: &'static str,
    broker: &str,
    addr: &str,
    after: Duration,
) -> crate::Error {
    crate::Error::at_broker(
        broker,
        addr,
        txmq_remoting::Error::Timeout {
            kind,
            peer: addr.to_string(),
            after,
        },
    )
}

/// The places of one queue, and how many attempts made in them the
/// broker answered (its progress).
#[derive(Debug)]
struct QueueLimit {
    /// The queue's broker and number (its topic is the sends' own).
    broker_name: String,
    queue: u32,
    places: Semaphore,
    answered: AtomicU64,
}

/// A place among a queue's stamped sends in flight, given back on drop.
/// (Its permit is forgotten as it is taken and added back on drop: the
/// queue's limit holds the semaphore, so a place holds one `Arc`, not two.)
#[derive(Debug)]
pub(crate) struct Place {
    limit: Arc<QueueLimit>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.limit.places.add_permits(1);
    }
}

impl Place {
    /// A place of `limit` free now, if there is one.
    fn free(limit: &Arc<QueueLimit>) -> Option<Place> {
        limit.places.try_acquire().ok()?.forget();
        Some(Place {
            limit: limit.clone(),
        })
    }

    /// Whether this is a place among the sends to `queue` of `broker_name`.
    pub(crate) fn is_for(&self, broker_name: &str, queue: u32) -> bool {
        self.limit.queue == queue && self.limit.broker_name == broker_name
    }

    /// Counts the queue's progress when the broker answered the attempt
    /// made in this place (a result or a refusal; a timeout is none): sends
    /// waiting for a place then keep their turn.
    pub(crate) fn answered<T>(&self, result: &std::result::Result<T, txmq_remoting::Error>) {
        if result
            .as_ref()
            .map_or_else(|e| e.remote().is_some(), |_| true)
        {
            self.limit.answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The producer-wide state; one per [`Producer`](crate::Producer) or
/// [`TransactionProducer`](crate::TransactionProducer).
#[derive(Debug, Default)]
pub(crate) struct Idempotence {
    brokers: Arc<Mutex<HashMap<String, BrokerState>>>,
    /// Sends with an unknown outcome: first message id, topic, and where
    /// they went.
    unknown: Mutex<VecDeque<(MsgId, String, Pending)>>,
    /// Whether `unknown` holds any (written under its lock): a send looks
    /// there twice, and almost always finds it empty, without the lock.
    any_unknown: AtomicBool,
}

#[derive(Debug, Default)]
struct BrokerState {
    session: Option<Session>,
    /// Single-flight `InitProducer` for this group.
    /// Its failures are kept with the address asked.
    opening: Arc<SingleFlight<(String, txmq_remoting::Error)>>,
    /// Stamped sends in flight, per topic and queue.
    limits: HashMap<String, HashMap<u32, Arc<QueueLimit>>>,
}

/// The ids to stamp requests to `broker_name` with, if it has a session.
fn current_in(brokers: &Mutex<HashMap<String, BrokerState>>, broker_name: &str) -> Option<Grant> {
    let brokers = lock(brokers);
    match brokers.get(broker_name)?.session.as_ref()? {
        Session::Stamped(ids) => Some(Grant::Stamped(ids.clone())),
        Session::Unsupported(since) if since.elapsed() < UNSUPPORTED_RETRY => Some(Grant::Plain),
        Session::Unsupported(_) => None,
    }
}

/// Asks the master of `broker_name` at `addr` for a producer id.
async fn open_session(
    broker_name: &str,
    addr: &str,
    pool: &ConnectionPool,
    timeout: Duration,
) -> Result<Session, txmq_remoting::Error> {
    let conn = pool.get(addr).await?;
    match conn.call_with_timeout(InitProducer {}, timeout).await {
        Ok(identity) => {
            tracing::debug!(broker = %broker_name, producer_id = identity.producer_id, "got a producer id");
            Ok(Session::Stamped(Arc::new(Ids::new(identity))))
        }
        Err(e)
            if e.remote()
                .is_some_and(|w| w.code == ErrorCode::UnsupportedRequest) =>
        {
            tracing::warn!(broker = %broker_name, "the broker does not support idempotent sends (an older version?); sending without sequence numbers, so a retried send may be stored twice");
            Ok(Session::Unsupported(Instant::now()))
        }
        Err(e) => Err(e),
    }
}

/// The entry of `key` in `map`, made when missing; allocates the key only
/// then (a send's hot path finds it).
fn entry_of<'a, V: Default>(map: &'a mut HashMap<String, V>, key: &str) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.to_string(), V::default());
    }
    // Inserted just above when it was missing.
    map.get_mut(key).expect("present")
}

#[derive(Debug, Clone)]
enum Session {
    Stamped(Arc<Ids>),
    /// The group does not know `InitProducer`: plain sends until then.
    Unsupported(Instant),
}

/// What a stamped request needs from its broker group: an id (or not).
#[derive(Debug, Clone)]
pub(crate) enum Grant {
    /// Stamp with these ids.
    Stamped(Arc<Ids>),
    /// The broker does not support idempotence: send unstamped.
    Plain,
}

/// One producer id of one broker group and the sequences drawn under it.
/// Replacing the id replaces this whole object, so that requests still in
/// flight under the old id keep their own bookkeeping.
#[derive(Debug)]
pub(crate) struct Ids {
    identity: ProducerIdentity,
    /// By topic and queue; prepares under [`PREPARES`].
    queues: Mutex<HashMap<String, HashMap<u32, QueueSeq>>>,
    /// A send ended: a stamp waiting for room in its queue's window looks again.
    ended: tokio::sync::Notify,
}

/// The key the prepares of a producer id are counted under, in place of a
/// (topic, queue): one sequence for all of them. No topic has an empty name.
pub(crate) const PREPARES: (&str, u32) = ("", 0);

#[derive(Debug, Default)]
struct QueueSeq {
    next: u64,
    /// Sequences in flight (a handful: at most
    /// [`MAX_IN_FLIGHT_PER_QUEUE`] sends), unordered; a Vec keeps its
    /// allocation from send to send.
    in_flight: Vec<u64>,
    /// The sends stamped since the oldest one not yet ended (sequence,
    /// ended), oldest first: the broker remembers the last
    /// [`MAX_IN_FLIGHT_PER_QUEUE`] batches, so no more are stamped while
    /// an older one may still be retried (see [`Ids::try_stamp_send`]).
    window: VecDeque<(u64, bool)>,
    /// A send found the window full: the next end wakes the sends waiting
    /// (only then: waking takes the producer-wide [`Ids::ended`]'s lock).
    waiting: bool,
}

/// A stamped send: where it went and with which stamp (kept while its
/// outcome is unknown). Its topic is the send's own.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub broker_name: String,
    pub queue: u32,
    pub count: u64,
    pub ids: Arc<Ids>,
    pub stamp: ProducerStamp,
}

/// How a stamped request ended, for the sequence bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The broker stored it (or had stored it).
    Stored,
    /// Surely not stored: its sequence may be drawn again.
    NotStored,
    /// Maybe stored.
    Unknown,
}

impl Ids {
    fn new(identity: ProducerIdentity) -> Ids {
        Ids {
            identity,
            queues: Mutex::new(HashMap::default()),
            ended: tokio::sync::Notify::new(),
        }
    }

    /// The producer id.
    pub(crate) fn producer_id(&self) -> u64 {
        self.identity.producer_id
    }

    /// [`Ids::stamp_send`], if fewer than [`MAX_IN_FLIGHT_PER_QUEUE`]
    /// sends were stamped since the oldest send of the queue still open (or
    /// `anyway`): however many later sends the broker stores meanwhile, a
    /// retry of that one is still among the batches it remembers, and is
    /// answered as the duplicate it is. [`queue_stamped`] waits for room a
    /// while, then stamps anyway (a send abandoned without ending leaves its
    /// place taken; the broker then answers a retry it forgot
    /// `DUPLICATE_SEQUENCE`, and stores nothing).
    pub(crate) fn try_stamp_send(
        &self,
        topic: &str,
        queue: u32,
        count: u64,
        anyway: bool,
    ) -> Option<ProducerStamp> {
        let mut queues = lock(&self.queues);
        let seq = entry_of(&mut queues, topic).entry(queue).or_default();
        while seq.window.front().is_some_and(|(_, done)| *done) {
            seq.window.pop_front();
        }
        if seq.window.len() >= MAX_IN_FLIGHT_PER_QUEUE && !anyway {
            seq.waiting = true;
            return None;
        }
        let stamp = Self::draw(seq, count);
        seq.window.push_back((stamp, false));
        Some(self.stamp(stamp))
    }

    /// The next `count` sequences of a queue, marked in flight.
    fn draw(seq: &mut QueueSeq, count: u64) -> u64 {
        let sequence = seq.next;
        seq.next += count;
        seq.in_flight.push(sequence);
        sequence
    }

    /// Draws the sequences of a send of `count` messages to `queue` of
    /// `topic`, and marks it in flight.
    pub(crate) fn stamp_send(&self, topic: &str, queue: u32, count: u64) -> ProducerStamp {
        let mut queues = lock(&self.queues);
        let seq = entry_of(&mut queues, topic).entry(queue).or_default();
        self.stamp(Self::draw(seq, count))
    }

    /// Draws the sequence of a prepare (one per prepare, whatever its
    /// size), and marks it in flight.
    pub(crate) fn stamp_prepare(&self) -> ProducerStamp {
        self.stamp_send(PREPARES.0, PREPARES.1, 1)
    }

    fn stamp(&self, sequence: u64) -> ProducerStamp {
        ProducerStamp {
            producer_id: self.identity.producer_id,
            token: self.identity.token,
            sequence,
        }
    }

    /// True while a send of `topic`/`queue` with a lower sequence than
    /// `sequence` is in flight under this id: an `OUT_OF_ORDER_SEQUENCE`
    /// then only means that one has not arrived yet.
    pub(crate) fn earlier_in_flight(&self, topic: &str, queue: u32, sequence: u64) -> bool {
        lock(&self.queues)
            .get(topic)
            .and_then(|q| q.get(&queue))
            .and_then(|q| q.in_flight.iter().min().copied())
            .is_some_and(|first| first < sequence)
    }

    /// A send ended: it is no longer in flight; a send surely not stored
    /// that was the last one drawn gives its sequences back.
    pub(crate) fn finish_send(
        &self,
        topic: &str,
        queue: u32,
        stamp: ProducerStamp,
        count: u64,
        ending: Ending,
    ) {
        let mut queues = lock(&self.queues);
        if let Some(seq) = queues.get_mut(topic).and_then(|q| q.get_mut(&queue)) {
            if let Some(at) = seq.in_flight.iter().position(|s| *s == stamp.sequence) {
                seq.in_flight.swap_remove(at);
            }
            // Open entries only: a sequence given back (not stored) and
            // drawn again is in the window twice, its first entry ended.
            if let Some(w) = seq
                .window
                .iter_mut()
                .find(|(s, done)| *s == stamp.sequence && !*done)
            {
                w.1 = true;
                if std::mem::take(&mut seq.waiting) {
                    self.ended.notify_waiters();
                }
            }
            if ending == Ending::NotStored && seq.next == stamp.sequence + count {
                seq.next = stamp.sequence;
            }
        }
    }

    /// A prepare ended (as [`Ids::finish_send`]).
    pub(crate) fn finish_prepare(&self, stamp: ProducerStamp, ending: Ending) {
        self.finish_send(PREPARES.0, PREPARES.1, stamp, 1, ending);
    }
}

/// The stamp slot of the requests that carry one.
fn stamp_slot(request: &mut Request) -> Option<&mut Option<ProducerStamp>> {
    match request {
        Request::Send(send) => Some(&mut send.producer),
        Request::PrepareTransaction(prepare) => Some(&mut prepare.producer),
        _ => None,
    }
}

/// Queues `request` on `conn` stamped under `ids` with the sequence `draw`
/// gives, drawn as its frame is queued on the connection: sends of one
/// queue reach the broker in the order of their sequences, however many
/// tasks share the producer (a sequence drawn before a wait would let a
/// later one overtake it, which the broker refuses as out of order).
/// While `draw(false)` gives none (the queue's window is full), waits for
/// a send of `ids` to end, then, `timeout` after the first refusal, draws
/// with `draw(true)`.
///
/// Returns the stamp drawn (`None` when nothing was sent) and the reply to
/// await: the caller holds the stamp before it waits, so that a send
/// dropped while waiting still ends it. With an error, the request may
/// have been sent (a write that failed after the draw closes the
/// connection, and the broker may have read the frame). `request` must
/// carry a stamp (a send or a prepare).
pub(crate) async fn queue_stamped<'c>(
    conn: &'c Connection,
    ids: &Ids,
    request: Request,
    timeout: Duration,
    draw: &mut (dyn FnMut(bool) -> Option<ProducerStamp> + Send),
) -> (
    Option<ProducerStamp>,
    Result<Reply<'c>, txmq_remoting::Error>,
) {
    // Most sends draw and are queued at once: done here in a plain call,
    // so that this future (held by every send's) holds no wait of its
    // own but a box, made only when the first try did not send.
    // (In a block, so that nothing of it is kept across the wait.)
    let (request, refused_until) = {
        let mut drawn = None;
        let mut asked = false;
        let first = {
            let mut stamp = stamp_on_queue(draw, timeout.is_zero(), &mut drawn);
            let mut ready = |r: &mut Request| {
                asked = true;
                stamp(r)
            };
            conn.try_request_when(request, timeout, &mut ready)
        };
        match first {
            Err(e) => return (drawn, Err(e)),
            Ok(Queued::Sent(reply)) => return (drawn, Ok(reply)),
            // A refused draw starts the time after which one is forced.
            Ok(Queued::NotReady(back)) => {
                (back, asked.then(|| tokio::time::Instant::now() + timeout))
            }
        }
    };
    Box::pin(queue_stamped_waiting(
        conn,
        ids,
        request,
        timeout,
        draw,
        refused_until,
    ))
    .await
}

/// [`queue_stamped`] once its first try did not send: waits for room in
/// the connection's queue, and for a place in the sequence window.
/// `deadline`: when a draw is forced, if the first try's draw was refused.
async fn queue_stamped_waiting<'c>(
    conn: &'c Connection,
    ids: &Ids,
    mut request: Request,
    timeout: Duration,
    draw: &mut (dyn FnMut(bool) -> Option<ProducerStamp> + Send),
    mut deadline: Option<tokio::time::Instant>,
) -> (
    Option<ProducerStamp>,
    Result<Reply<'c>, txmq_remoting::Error>,
) {
    // Read from the clock only once a draw was refused.
    loop {
        // Made before the draw (no lock taken): it sees every end after
        // that, so one between a refused draw and the wait is not missed.
        let ended = ids.ended.notified();
        let anyway = match deadline {
            Some(at) => tokio::time::Instant::now() >= at,
            None => timeout.is_zero(),
        };
        let mut drawn = None;
        let queued = {
            let mut ready = stamp_on_queue(draw, anyway, &mut drawn);
            conn.request_when(request, timeout, &mut ready).await
        };
        // The answer is taken apart before the wait below, so that this
        // future does not keep it (and its request) across the wait.
        request = match queued {
            Err(e) => return (drawn, Err(e)),
            Ok(Queued::Sent(reply)) => return (drawn, Ok(reply)),
            Ok(Queued::NotReady(back)) => back,
        };
        let at = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + timeout);
        // Boxed: the timer would take a place in every send's future.
        let _ = Box::pin(tokio::time::timeout_at(at, ended)).await;
    }
}

/// The `ready` of a stamped request: draws its stamp with `draw(anyway)`
/// as its frame is queued, and leaves what it drew in `drawn`.
fn stamp_on_queue<'a>(
    draw: &'a mut (dyn FnMut(bool) -> Option<ProducerStamp> + Send),
    anyway: bool,
    drawn: &'a mut Option<ProducerStamp>,
) -> impl FnMut(&mut Request) -> bool + Send + 'a {
    move |r| match stamp_slot(r) {
        Some(slot) => {
            *slot = draw(anyway);
            *drawn = *slot;
            drawn.is_some()
        }
        None => true,
    }
}

/// True for the refusals after which the stamp's producer id cannot be
/// used any more (nothing was stored): ask for a new one and stamp again.
pub(crate) fn id_refused(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::UnknownProducerId | ErrorCode::ProducerFenced
    )
}

impl Idempotence {
    /// The ids to stamp requests to broker group `broker_name` with,
    /// asking its master at `addr` for a producer id if there is none.
    ///
    /// # Errors
    /// The `InitProducer` request's failure (nothing was sent then).
    pub(crate) async fn grant(
        &self,
        broker_name: &str,
        addr: &str,
        pool: &ConnectionPool,
        timeout: Duration,
    ) -> Result<Grant, txmq_remoting::Error> {
        if let Some(grant) = self.current(broker_name) {
            return Ok(grant);
        }
        // The broker group has no producer id yet: one caller asks for it,
        // the others wait for its answer (or its failure). Boxed, as
        // `RouteCache::get`'s fetch: sends await this each time.
        Box::pin(async move {
            let waiting_since = Instant::now();
            let opening = lock(&self.brokers)
                .entry(broker_name.to_string())
                .or_default()
                .opening
                .clone();
            let brokers = self.brokers.clone();
            let peer = addr.to_string();
            let (broker_name, addr, pool) =
                (broker_name.to_string(), addr.to_string(), pool.clone());
            let asked = opening.run(waiting_since, move |failed| async move {
                if let Some(grant) = current_in(&brokers, &broker_name) {
                    return (Ok(grant), Remember::Nothing);
                }
                // Another address's failure (the group's old master, before
                // a failover) is not this one's.
                if let Some((_, e)) = failed.filter(|(at, _)| *at == addr) {
                    return (Err(e), Remember::Nothing);
                }
                match open_session(&broker_name, &addr, &pool, timeout).await {
                    Ok(session) => {
                        let grant = match &session {
                            Session::Stamped(ids) => Grant::Stamped(ids.clone()),
                            Session::Unsupported(_) => Grant::Plain,
                        };
                        lock(&brokers).entry(broker_name).or_default().session = Some(session);
                        (Ok(grant), Remember::Success)
                    }
                    Err(e) => (Err(e.clone()), Remember::Failure((addr, e))),
                }
            });
            asked.await.unwrap_or_else(|e| {
                Err(txmq_remoting::Error::Connect {
                    addr: peer,
                    message: format!("the producer id request failed: {e}"),
                })
            })
        })
        .await
    }

    fn current(&self, broker_name: &str) -> Option<Grant> {
        current_in(&self.brokers, broker_name)
    }

    /// Forgets the producer id `ids` of `broker_name` (if it is still the
    /// current one): the next request there asks for a new one, with all
    /// sequences from 0. Returns true when it was the current one.
    pub(crate) fn drop_ids(&self, broker_name: &str, ids: &Arc<Ids>) -> bool {
        let mut brokers = lock(&self.brokers);
        let Some(state) = brokers.get_mut(broker_name) else {
            return false;
        };
        match &state.session {
            Some(Session::Stamped(current)) if Arc::ptr_eq(current, ids) => {
                state.session = None;
                true
            }
            _ => false,
        }
    }

    /// Waits for a place among the [`MAX_IN_FLIGHT_PER_QUEUE`] stamped
    /// sends in flight to `queue` of `topic` on `broker_name`, as long as
    /// the queue makes progress: `None` once the broker answered no send
    /// of the queue for `stall` (it does not answer; sends that time out
    /// are no progress). Sends queued behind a busy
    /// broker keep their turn however long the queue is; sends queued
    /// behind a silent one end on time.
    pub(crate) async fn permit(
        &self,
        broker_name: &str,
        topic: &str,
        queue: u32,
        stall: Duration,
    ) -> Option<Place> {
        let limit = {
            let mut brokers = lock(&self.brokers);
            entry_of(&mut entry_of(&mut brokers, broker_name).limits, topic)
                .entry(queue)
                .or_insert_with(|| {
                    Arc::new(QueueLimit {
                        broker_name: broker_name.to_string(),
                        queue,
                        places: Semaphore::new(MAX_IN_FLIGHT_PER_QUEUE),
                        answered: AtomicU64::new(0),
                    })
                })
                .clone()
        };
        // A free place needs no timer.
        if let Some(place) = Place::free(&limit) {
            return Some(place);
        }
        // Boxed, as `RouteCache::get`'s fetch: sends await this each time.
        Box::pin(wait_for_place(limit, stall)).await
    }

    /// What [`Idempotence::grant`] and [`Idempotence::permit`] give a send
    /// in the common case, in one look under the lock: the ids of
    /// `broker_name` and a place among the stamped sends to `queue` of
    /// `topic`, when the group has ids and the queue a free place now.
    /// `None` otherwise: the two then ask for ids, or wait for a place.
    pub(crate) fn ready(
        &self,
        broker_name: &str,
        topic: &str,
        queue: u32,
    ) -> Option<(Arc<Ids>, Place)> {
        let brokers = lock(&self.brokers);
        let state = brokers.get(broker_name)?;
        let Some(Session::Stamped(ids)) = &state.session else {
            return None;
        };
        let place = Place::free(state.limits.get(topic)?.get(&queue)?)?;
        Some((ids.clone(), place))
    }

    /// Remembers a send of `topic` with an unknown outcome under its first
    /// message id.
    pub(crate) fn remember(&self, first: MsgId, topic: &str, pending: Pending) {
        let mut unknown = lock(&self.unknown);
        unknown.retain(|(id, ..)| *id != first);
        if unknown.len() >= REMEMBERED_UNKNOWN {
            unknown.pop_front();
        }
        unknown.push_back((first, topic.to_string(), pending));
        self.any_unknown.store(true, Ordering::Release);
    }

    /// The send with an unknown outcome whose first message id is
    /// `first`, of `count` messages of `topic`, if one is remembered.
    pub(crate) fn recall(&self, first: MsgId, topic: &str, count: u64) -> Option<Pending> {
        if !self.any_unknown.load(Ordering::Acquire) {
            return None;
        }
        lock(&self.unknown)
            .iter()
            .find(|(id, t, p)| *id == first && t == topic && p.count == count)
            .map(|(.., p)| p.clone())
    }

    /// Forgets the remembered send of `first`.
    pub(crate) fn forget(&self, first: MsgId) {
        if !self.any_unknown.load(Ordering::Acquire) {
            return;
        }
        let mut unknown = lock(&self.unknown);
        if !unknown.is_empty() {
            unknown.retain(|(id, ..)| *id != first);
            self.any_unknown
                .store(!unknown.is_empty(), Ordering::Release);
        }
    }
}

/// [`Idempotence::permit`] when every place of the queue is taken: waits
/// for one as long as the queue makes progress (`None` once no send of it
/// was answered for `stall`).
async fn wait_for_place(limit: Arc<QueueLimit>, stall: Duration) -> Option<Place> {
    let mut seen = limit.answered.load(Ordering::Relaxed);
    loop {
        let waited = tokio::time::timeout(stall, limit.places.acquire())
            .await
            .map(|acquired| acquired.map(|p| p.forget()));
        match waited {
            Ok(Ok(())) => return Some(Place { limit }),
            // The semaphore is never closed.
            Ok(Err(_)) => return None,
            Err(_) => {
                let now = limit.answered.load(Ordering::Relaxed);
                if now == seen {
                    return None;
                }
                seen = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> Ids {
        Ids::new(ProducerIdentity {
            producer_id: 7,
            token: 9,
            expiry_ms: 1000,
        })
    }

    /// A send finds a free place at once; past the limit it waits for one
    /// while the queue makes progress, and gives up once no send of the
    /// queue was answered for `stall`.
    #[tokio::test(start_paused = true)]
    async fn a_place_is_waited_for_while_the_queue_makes_progress() {
        let idem = Idempotence::default();
        let stall = Duration::from_secs(5);
        let mut held = Vec::new();
        for _ in 0..MAX_IN_FLIGHT_PER_QUEUE {
            held.push(idem.permit("b", "t", 0, stall).await.expect("a free place"));
        }
        // Another queue is not held up.
        assert!(idem.permit("b", "t", 1, stall).await.is_some());

        // Full: a place given back within `stall` goes to the waiter.
        let waiting = idem.permit("b", "t", 0, stall);
        let freed = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            drop(held.pop());
        };
        let (place, ()) = tokio::join!(waiting, freed);
        held.push(place.expect("the place given back"));

        // Answers keep a waiter waiting past `stall`; none for `stall` ends it.
        let waiting = idem.permit("b", "t", 0, stall);
        let progress = async {
            tokio::time::sleep(Duration::from_secs(4)).await;
            held[0].answered::<()>(&Ok(()));
            tokio::time::sleep(Duration::from_secs(4)).await;
            drop(held.pop());
        };
        let (place, ()) = tokio::join!(waiting, progress);
        held.push(place.expect("progress within each stall"));
        let started = tokio::time::Instant::now();
        assert!(idem.permit("b", "t", 0, stall).await.is_none());
        assert!(started.elapsed() >= stall);

        // One answer buys one more `stall`, not more.
        let waiting = tokio::time::timeout(3 * stall, idem.permit("b", "t", 0, stall));
        let one_answer = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            held[0].answered::<()>(&Ok(()));
        };
        let started = tokio::time::Instant::now();
        let (place, ()) = tokio::join!(waiting, one_answer);
        assert!(place.expect("waited on past two stalls").is_none());
        assert_eq!(started.elapsed(), 2 * stall);
    }

    /// The one-look path gives the ids `grant` would and a place `permit`
    /// would, and nothing where they would ask for ids or wait for a place.
    #[tokio::test]
    async fn a_send_gets_ids_and_a_free_place_in_one_look_or_none() {
        let idem = Idempotence::default();
        let stall = Duration::from_secs(5);
        // No ids yet, no limit yet.
        assert!(idem.ready("b", "t", 0).is_none());
        let current = Arc::new(ids());
        lock(&idem.brokers)
            .entry("b".to_string())
            .or_default()
            .session = Some(Session::Stamped(current.clone()));
        assert!(idem.ready("b", "t", 0).is_none(), "no limit made yet");
        let mut held = vec![idem.permit("b", "t", 0, stall).await.expect("a free place")];
        for _ in 0..MAX_IN_FLIGHT_PER_QUEUE {
            let Some((ids, place)) = idem.ready("b", "t", 0) else {
                break;
            };
            assert!(Arc::ptr_eq(&ids, &current), "the group's current ids");
            assert!(place.is_for("b", 0));
            held.push(place);
        }
        // The places are the queue's own, counted with `permit`'s.
        assert_eq!(held.len(), MAX_IN_FLIGHT_PER_QUEUE);
        let other = idem
            .permit("b", "t", 1, stall)
            .await
            .expect("another queue");
        assert!(
            idem.ready("b", "t", 1).is_some(),
            "another queue's places are its own"
        );
        drop(other);
        // One given back is free for the next send.
        drop(held.pop());
        held.push(idem.ready("b", "t", 0).expect("the place given back").1);
        drop(held);
        // Ids dropped (a fenced producer id, say): `grant` asks for new ones.
        lock(&idem.brokers).get_mut("b").unwrap().session = None;
        assert!(idem.ready("b", "t", 0).is_none());
        // A group without idempotence (an older broker) is `grant`'s to answer.
        lock(&idem.brokers).get_mut("b").unwrap().session =
            Some(Session::Unsupported(Instant::now()));
        assert!(idem.ready("b", "t", 0).is_none());
    }

    #[test]
    fn no_more_than_five_sends_are_stamped_past_the_oldest_open_one() {
        let ids = ids();
        let oldest = ids.try_stamp_send("t", 0, 1, false).expect("room");
        for _ in 0..4 {
            let s = ids.try_stamp_send("t", 0, 1, false).expect("room");
            // Answered: they end, but the oldest is still open.
            ids.finish_send("t", 0, s, 1, Ending::Stored);
        }
        // A sixth would let the broker forget the oldest: no stamp yet.
        assert_eq!(ids.try_stamp_send("t", 0, 1, false), None);
        // Another queue is not held up.
        assert_eq!(
            ids.try_stamp_send("t", 1, 1, false).map(|s| s.sequence),
            Some(0)
        );
        ids.finish_send("t", 0, oldest, 1, Ending::Stored);
        let sixth = ids
            .try_stamp_send("t", 0, 1, false)
            .expect("room once the oldest ended");
        assert_eq!(sixth.sequence, 5);
        // A send abandoned without ending holds its place until the caller
        // stops waiting and stamps anyway.
        let _abandoned = ids.try_stamp_send("t", 2, 1, false);
        for _ in 0..4 {
            let s = ids.try_stamp_send("t", 2, 1, false).expect("room");
            ids.finish_send("t", 2, s, 1, Ending::Stored);
        }
        assert_eq!(ids.try_stamp_send("t", 2, 1, false), None);
        let late = ids.try_stamp_send("t", 2, 1, true).expect("anyway");
        assert_eq!(late.sequence, 5);
    }

    #[test]
    fn a_sequence_drawn_again_ends_its_own_window_entry() {
        let ids = ids();
        let open = ids.try_stamp_send("t", 0, 1, false).expect("room");
        let lost = ids.try_stamp_send("t", 0, 1, false).expect("room");
        // Surely not stored and the last drawn: its sequence is drawn again.
        ids.finish_send("t", 0, lost, 1, Ending::NotStored);
        let again = ids.try_stamp_send("t", 0, 1, false).expect("room");
        assert_eq!(again.sequence, lost.sequence);
        ids.finish_send("t", 0, again, 1, Ending::Stored);
        ids.finish_send("t", 0, open, 1, Ending::Stored);
        // Every send ended: the window is empty again, five fit.
        for _ in 0..5 {
            let s = ids.try_stamp_send("t", 0, 1, false).expect("room");
            ids.finish_send("t", 0, s, 1, Ending::Stored);
        }
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(ids.try_stamp_send("t", 0, 1, false).expect("room"));
        }
        assert_eq!(ids.try_stamp_send("t", 0, 1, false), None);
    }

    #[test]
    fn sends_are_numbered_per_queue_by_message_count() {
        let ids = ids();
        let a = ids.stamp_send("t", 0, 3);
        let b = ids.stamp_send("t", 0, 1);
        let other = ids.stamp_send("t", 1, 2);
        let other_topic = ids.stamp_send("u", 0, 1);
        assert_eq!((a.sequence, b.sequence), (0, 3));
        assert_eq!((other.sequence, other_topic.sequence), (0, 0));
        assert_eq!((a.producer_id, a.token), (7, 9));
        assert!(ids.earlier_in_flight("t", 0, 3));
        assert!(!ids.earlier_in_flight("t", 0, 0));
        ids.finish_send("t", 0, a, 3, Ending::Stored);
        assert!(!ids.earlier_in_flight("t", 0, 3));
    }

    #[test]
    fn a_send_surely_not_stored_gives_its_sequences_back_if_it_was_the_last() {
        let ids = ids();
        let a = ids.stamp_send("t", 0, 2);
        ids.finish_send("t", 0, a, 2, Ending::NotStored);
        assert_eq!(ids.stamp_send("t", 0, 1).sequence, 0);
        // Not the last one drawn: the gap stays (the broker refuses the
        // later one, and the producer takes a new id).
        let b = ids.stamp_send("t", 0, 1);
        let _c = ids.stamp_send("t", 0, 1);
        ids.finish_send("t", 0, b, 1, Ending::NotStored);
        assert_eq!(ids.stamp_send("t", 0, 1).sequence, 3);
        // Unknown outcomes keep their sequences.
        let d = ids.stamp_send("t", 0, 1);
        ids.finish_send("t", 0, d, 1, Ending::Unknown);
        assert_eq!(ids.stamp_send("t", 0, 1).sequence, 5);
    }

    #[test]
    fn prepares_share_one_sequence() {
        let ids = ids();
        assert_eq!(ids.stamp_prepare().sequence, 0);
        let b = ids.stamp_prepare();
        assert_eq!(b.sequence, 1);
        ids.finish_prepare(b, Ending::NotStored);
        assert_eq!(ids.stamp_prepare().sequence, 1);
    }

    #[test]
    fn unknown_sends_are_remembered_by_first_message_id() {
        let idem = Idempotence::default();
        let ids = Arc::new(ids());
        let m = MsgId::generate();
        let pending = Pending {
            broker_name: "b".into(),
            queue: 2,
            count: 1,
            stamp: ids.stamp_send("t", 2, 1),
            ids,
        };
        idem.remember(m, "t", pending.clone());
        assert!(idem.recall(m, "t", 1).is_some());
        assert!(idem.recall(m, "u", 1).is_none());
        assert!(idem.recall(m, "t", 2).is_none());
        assert!(idem.recall(MsgId::generate(), "t", 1).is_none());
        idem.forget(m);
        assert!(idem.recall(m, "t", 1).is_none());
        // Remembered again after the list emptied, and kept while another
        // one is forgotten.
        idem.remember(m, "t", pending.clone());
        let other = MsgId::generate();
        idem.remember(other, "t", pending);
        idem.forget(other);
        assert!(idem.recall(m, "t", 1).is_some());
        assert!(idem.recall(other, "t", 1).is_none());
    }
}
