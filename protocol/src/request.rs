//! Every request kind, its arguments and its response, in one place.
//!
//! [`Request`] and [`Response`] are generated from one table so that a
//! request and the type of its answer can never drift apart; [`Call`] ties
//! each argument type to its reply type for typed clients.

use serde::{Deserialize, Serialize};

use crate::frame::{Hello, HelloOk};
use crate::message::{Message, MsgId, StoredMessage};

/// A request argument type that knows its [`Request`] variant and reply type.
pub trait Call: Sized {
    /// What a successful answer carries.
    type Reply;
    /// Wraps the arguments in their [`Request`] variant.
    fn into_request(self) -> Request;
    /// Unwraps the matching [`Response`] variant; any other variant is handed back.
    ///
    /// # Errors
    /// Returns the response unchanged when it is not this request's reply.
    fn from_response(r: Response) -> Result<Self::Reply, Response>;
    /// Wraps an answer in this request's [`Response`] variant (what a
    /// server sends back).
    fn response(reply: Self::Reply) -> Response;
}

/// Builds [`Request`], [`Response`] and the [`Call`] impls from one table.
///
/// `box` in front of a type keeps that argument or answer on the heap in
/// the enum: every request and answer is moved whole several times on its
/// way through a connection (decoded, queued, handed over), and a move of
/// more than 128 bytes is a `memcpy` call. So every kind larger than a send
/// is boxed, and a frame stays small enough to move in a few registers (see
/// `frame_size_tests`). A boxed kind costs an allocation per request on
/// each side: nothing next to what a pull, an offset commit or a heartbeat
/// does anyway, and sends are not boxed. [`Call`] takes and gives the types
/// themselves either way.
macro_rules! requests {
    // The table, read one entry at a time.
    (@read [$($done:tt)*]) => { requests!(@emit $($done)*); };
    (@read [$($done:tt)*] $(#[$doc:meta])* $variant:ident(box $req:ty) -> box $resp:ty; $($rest:tt)*) => {
        requests!(@read [$($done)* {[$(#[$doc])*] $variant boxed($req) boxed($resp)}] $($rest)*);
    };
    (@read [$($done:tt)*] $(#[$doc:meta])* $variant:ident(box $req:ty) -> $resp:ty; $($rest:tt)*) => {
        requests!(@read [$($done)* {[$(#[$doc])*] $variant boxed($req) inline($resp)}] $($rest)*);
    };
    (@read [$($done:tt)*] $(#[$doc:meta])* $variant:ident($req:ty) -> box $resp:ty; $($rest:tt)*) => {
        requests!(@read [$($done)* {[$(#[$doc])*] $variant inline($req) boxed($resp)}] $($rest)*);
    };
    (@read [$($done:tt)*] $(#[$doc:meta])* $variant:ident($req:ty) -> $resp:ty; $($rest:tt)*) => {
        requests!(@read [$($done)* {[$(#[$doc])*] $variant inline($req) inline($resp)}] $($rest)*);
    };
    (@held inline $t:ty) => { $t };
    (@held boxed $t:ty) => { Box<$t> };
    (@hold inline $x:expr) => { $x };
    (@hold boxed $x:expr) => { Box::new($x) };
    (@release inline $x:expr) => { $x };
    (@release boxed $x:expr) => { *$x };
    (@emit $( {[$(#[$doc:meta])*] $variant:ident $rk:ident($req:ty) $sk:ident($resp:ty)} )*) => {
        /// A request: what one peer asks of another.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub enum Request {
            $( $(#[$doc])* $variant(requests!(@held $rk $req)), )*
        }

        /// A successful answer; the variant matches the request's.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub enum Response {
            $( #[allow(missing_docs)] $variant(requests!(@held $sk $resp)), )*
        }

        impl Request {
            /// The request kind's name, for logs and errors.
            pub fn kind(&self) -> &'static str {
                match self { $( Request::$variant(_) => stringify!($variant), )* }
            }
        }

        $(
        impl Call for $req {
            type Reply = $resp;
            fn into_request(self) -> Request { Request::$variant(requests!(@hold $rk self)) }
            fn from_response(r: Response) -> Result<$resp, Response> {
                match r { Response::$variant(x) => Ok(requests!(@release $sk x)), other => Err(other) }
            }
            fn response(reply: $resp) -> Response { Response::$variant(requests!(@hold $sk reply)) }
        }
        )*
    };
    ($($table:tt)*) => { requests!(@read [] $($table)*); };
}

requests! {
    /// The first frame on every connection.
    Hello(Hello) -> HelloOk;
    /// Liveness probe.
    Ping(Ping) -> Pong;
    /// Broker -> nameserver: register or heartbeat, with the broker's topic table.
    RegisterBroker(box RegisterBroker) -> Done;
    /// Broker -> nameserver: the broker is leaving (graceful shutdown).
    UnregisterBroker(UnregisterBroker) -> Done;
    /// Client -> nameserver: where a topic's queues are.
    GetRoute(GetRoute) -> TopicRoute;
    /// Client -> nameserver: the brokers it knows.
    GetCluster(GetCluster) -> ClusterInfo;
    /// Client -> nameserver or broker: every topic known.
    ListTopics(ListTopics) -> TopicList;
    /// Client -> broker: create (or update) a topic.
    CreateTopic(CreateTopic) -> TopicConfig;
    /// Client -> broker: append one message or a batch to one queue.
    Send(SendRequest) -> SendResult;
    /// Producer -> broker: a producer id (and its token) for idempotent
    /// sends and prepares, never handed out twice by the broker group.
    InitProducer(InitProducer) -> ProducerIdentity;
    /// Client -> broker: read a queue from an offset, waiting for data up to a deadline.
    Pull(box PullRequest) -> PullResult;
    /// Client -> broker: store a consumer group's offset for a queue.
    CommitOffset(box CommitOffset) -> Done;
    /// Client -> broker: a group's committed offset and the queue's bounds.
    QueryOffset(QueryOffset) -> QueueOffsets;
    /// Producer -> broker: store half messages, invisible until committed.
    PrepareTransaction(box PrepareTransaction) -> Prepared;
    /// Producer or operator -> broker: commit or roll back a transaction.
    EndTransaction(EndTransaction) -> Ended;
    /// Broker -> producer (over the producer's own connection): what became of this transaction?
    CheckTransaction(box CheckTransaction) -> CheckAnswer;
    /// Operator -> broker: pending and parked transactions, and counters.
    ListTransactions(ListTransactions) -> box TransactionList;
    /// Operator or bench -> broker: the store's write and fsync counters.
    GetStoreStats(GetStoreStats) -> box StoreStats;
    /// Consumer -> broker: I am alive in this group, subscribed to these
    /// topics, holding these queues; which of your queues are mine?
    Heartbeat(box Heartbeat) -> HeartbeatOk;
    /// Consumer -> broker: leaving the group (clean shutdown).
    LeaveGroup(LeaveGroup) -> Done;
    /// Broker -> consumer (over the consumer's own connection): the group
    /// changed; heartbeat now to learn the new assignment.
    NotifyRebalance(NotifyRebalance) -> Done;
    /// Consumer -> broker: hand a message back for redelivery to the group
    /// after a back-off, or to the group's dead-letter topic.
    SendBack(box SendBack) -> SentBack;
    /// Operator -> broker: the consumer groups it knows.
    ListGroups(ListGroups) -> GroupList;
    /// Operator -> broker: a group's members, assignment, offsets and lag.
    GetGroupState(GetGroupState) -> box GroupState;
    /// Operator -> broker: move a group's offsets of a topic (the group must be stopped).
    ResetOffset(ResetOffset) -> OffsetsReset;
    /// Slave -> master: the commit log from a position (long poll).
    ReplicaFetch(box ReplicaFetch) -> box ReplicaData;
    /// Slave -> master: the slave holds the log up to a position (per its flush mode).
    ReplicaAck(ReplicaAck) -> Done;
    /// Anyone -> broker: its role, its master, and (on a master) its replicas' lag.
    GetReplication(GetReplication) -> box ReplicationInfo;
    /// Slave -> master: where the master's history of an epoch ends, for
    /// the slave to truncate its log to where both agree.
    EpochEnd(EpochEndQuery) -> EpochEnd;
    /// Broker -> controller: it is alive; the answer is its group's state
    /// (held up to `wait_ms` until that state changes).
    ControllerHeartbeat(box ControllerHeartbeat) -> box BrokerGroupState;
    /// Master -> controller: change its group's in-sync set.
    AlterInSync(box AlterInSync) -> box BrokerGroupState;
    /// Admin -> nameserver or controller: a planned switch of a group's
    /// master (drain, then elect).
    ElectMaster(ElectMaster) -> box BrokerGroupState;
    /// Master -> controller: it drained for a planned switch; elect the target.
    MasterDrained(MasterDrained) -> box BrokerGroupState;
    /// Anyone -> nameserver or controller: the controller's members, leader
    /// and every broker group's state.
    GetControllerInfo(GetControllerInfo) -> box ControllerInfo;
    /// Controller -> controller: one Raft message (openraft's request,
    /// MessagePack-encoded).
    Raft(RaftRpc) -> RaftReply;
    /// Client -> server, right after a hello answered with a challenge:
    /// who it is and its proof. Answered like the hello it completes.
    Authenticate(Authenticate) -> HelloOk;
    /// Operator -> broker: a transaction's half messages, check history
    /// and state (or how it ended).
    ShowTransaction(crate::ops::ShowTransaction) -> box crate::ops::TxDetail;
    /// Operator -> broker: un-park a transaction and check it back now.
    RecheckTransaction(crate::ops::RecheckTransaction) -> crate::ops::Rechecked;
    /// Operator -> broker: re-send a consumer group's dead letters.
    ResendDeadLetters(box crate::ops::ResendDeadLetters) -> box crate::ops::DeadLettersResent;
    /// Operator -> broker: delete a topic (config, queues, offsets).
    DeleteTopic(crate::ops::DeleteTopic) -> box crate::ops::TopicDeleted;
    /// Anyone -> broker: a topic's queues with their bounds.
    GetTopicStatus(crate::ops::GetTopicStatus) -> box crate::ops::TopicStatus;
    /// Operator -> broker: the records of a message id (`txmq msg show`).
    LookupMessage(crate::lookup::LookupMessage) -> box crate::lookup::FoundMessages;
    /// Client -> broker: messages of a topic by key (`txmq msg find`).
    FindMessages(box crate::lookup::FindMessages) -> box crate::lookup::FoundMessages;
    /// Client -> broker: messages of a queue by offset (`txmq msg get`).
    GetMessages(crate::lookup::GetMessages) -> box crate::lookup::FoundMessages;
    /// Anyone signed in -> broker: its counters (`txmq dashboard`).
    GetBrokerCounters(crate::dashboard::GetBrokerCounters) -> box crate::dashboard::BrokerCounters;
}

/// The answer to a hello's challenge: an access key and
/// the signature of the challenge (see `txmq_remoting::auth_signature`) under that key's secret. The
/// secret never travels; the challenge is new on every connection, so a
/// recorded answer is worth nothing on another.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Authenticate {
    /// The user's access key.
    pub access_key: String,
    /// HMAC-SHA256 of the challenge, keyed by the user's secret.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl std::fmt::Debug for Authenticate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticate")
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

/// Message property: when the message becomes visible, ms since the Unix
/// epoch (set by the producer for a delayed message).
pub const PROPERTY_DELIVER_AT: &str = "TXMQ_DELIVER_AT";
/// Message property: how many times the message was handed back for retry.
pub const PROPERTY_RECONSUME_TIMES: &str = "TXMQ_RECONSUME_TIMES";
/// Message property: the topic a retried or dead-lettered message was first sent to.
pub const PROPERTY_REAL_TOPIC: &str = "TXMQ_REAL_TOPIC";
/// Message property: the queue id it was first stored in.
pub const PROPERTY_REAL_QUEUE: &str = "TXMQ_REAL_QUEUE";
/// Set by a broker with an ACL file on a message a consumer handed back
/// from its own copy (its record was gone): where it came from is the
/// consumer's word, not the broker's, so a re-send of its dead letter must
/// name the topic (`--to`). Producers cannot set it.
pub const PROPERTY_REPORTED_ORIGIN: &str = "TXMQ_REPORTED_ORIGIN";

/// What a consumer group's retry topic starts with.
pub const RETRY_TOPIC_PREFIX: &str = "%RETRY%";

/// The retry topic of a consumer group: messages handed back wait here.
pub fn retry_topic(group: &str) -> String {
    format!("{RETRY_TOPIC_PREFIX}{group}")
}

/// What a consumer group's dead-letter topic starts with.
pub const DLQ_TOPIC_PREFIX: &str = "%DLQ%";

/// The dead-letter topic of a consumer group.
pub fn dlq_topic(group: &str) -> String {
    format!("{DLQ_TOPIC_PREFIX}{group}")
}

/// A topic may be read (consumed).
pub const PERM_READ: u8 = 4;
/// A topic may be written (sent to).
pub const PERM_WRITE: u8 = 2;
/// Read and write.
pub const PERM_READ_WRITE: u8 = PERM_READ | PERM_WRITE;

/// Liveness probe.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ping {}

/// Answer to [`Ping`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pong {}

/// A plain "done" answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Done {}

/// A topic's configuration on one broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// Topic name.
    pub name: String,
    /// Number of queues.
    pub queues: u32,
    /// Permission bits ([`PERM_READ`], [`PERM_WRITE`]).
    pub perm: u8,
}

/// Broker registration or heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterBroker {
    /// Cluster the broker belongs to.
    pub cluster: String,
    /// The broker group's name: one master and its slaves share it.
    pub broker_name: String,
    /// Address clients connect to.
    pub addr: String,
    /// Every (non-internal) topic the broker serves.
    pub topics: Vec<TopicConfig>,
    /// Master or slave of its broker group (older brokers: master).
    #[serde(default)]
    pub role: BrokerRole,
    /// A master's epoch, as the controller elected it (0: a broker not run
    /// by a controller). Of two masters of one group, the higher epoch is
    /// the group's master.
    #[serde(default)]
    pub epoch: u64,
}

/// A broker's role in its broker group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum BrokerRole {
    /// Takes writes; its slaves copy its commit log.
    #[default]
    Master,
    /// Copies the master's commit log; serves reads, refuses writes (`NOT_MASTER`).
    Slave,
}

impl BrokerRole {
    /// `master`, `slave`.
    pub fn name(self) -> &'static str {
        match self {
            BrokerRole::Master => "master",
            BrokerRole::Slave => "slave",
        }
    }
}

/// A broker's goodbye.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnregisterBroker {
    /// The leaving broker's name.
    pub broker_name: String,
    /// The leaving broker's address, as it registered it: a nameserver
    /// removes the name only for the broker that holds it (this address, or
    /// the connection it registered over). Empty from older brokers.
    #[serde(default)]
    pub addr: String,
}

/// Route query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetRoute {
    /// Topic name.
    pub topic: String,
}

/// Where a topic lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicRoute {
    /// Topic name.
    pub topic: String,
    /// One entry per broker serving the topic, sorted by broker name.
    pub brokers: Vec<BrokerQueues>,
}

/// The queues of a topic on one broker group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerQueues {
    /// Broker (group) name.
    pub broker_name: String,
    /// The master's address; empty when no master of the group is live
    /// (then only its slaves serve reads).
    pub addr: String,
    /// The addresses of the group's live slaves (readable when the master
    /// is unreachable), sorted.
    #[serde(default)]
    pub slaves: Vec<String>,
    /// Number of queues of the topic on this broker.
    pub queues: u32,
    /// Permission bits.
    pub perm: u8,
    /// The master's epoch (0: not run by a controller).
    #[serde(default)]
    pub epoch: u64,
}

/// Cluster listing query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GetCluster {}

/// The brokers a nameserver knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Sorted by cluster then broker name.
    pub brokers: Vec<BrokerInfo>,
}

/// One broker as the nameserver sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BrokerInfo {
    /// Cluster name.
    pub cluster: String,
    /// Broker name.
    pub broker_name: String,
    /// Broker address.
    pub addr: String,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_ms_ago: u64,
    /// How many topics it serves.
    pub topic_count: u32,
    /// Master or slave (older nameservers: master).
    #[serde(default)]
    pub role: BrokerRole,
    /// A master's epoch (0: not run by a controller, or a slave).
    #[serde(default)]
    pub epoch: u64,
}

/// Topic listing query.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListTopics {}

/// Known topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicList {
    /// One entry per (topic, broker), sorted.
    pub topics: Vec<TopicOnBroker>,
}

/// A topic on a broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicOnBroker {
    /// Broker name.
    pub broker_name: String,
    /// The topic there.
    pub config: TopicConfig,
}

/// Create or update a topic on the broker that receives the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateTopic {
    /// Topic name: 1 to 127 characters of `A-Z a-z 0-9 - _ . %`.
    pub topic: String,
    /// Number of queues, 1 to 1024.
    pub queues: u32,
    /// Permission bits.
    pub perm: u8,
}

/// Append messages to one queue. All messages must name the same topic.
///
/// Also read and written without serde, in `fast.rs`: a change to its
/// fields or their serde attributes changes that code too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendRequest {
    /// The queue id within the topic.
    pub queue: u32,
    /// One message or a batch; stored contiguously, in order.
    pub messages: Vec<Message>,
    /// Idempotence: the producer id, its token and the sequence number of
    /// the first message (the batch's messages take the next ones). A
    /// retried send with the same stamp is answered with the result the
    /// first one got (`duplicate` set) and stored once; `None`: a plain send.
    #[serde(default)]
    pub producer: Option<ProducerStamp>,
}

/// Ask for a producer id (see [`ProducerStamp`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InitProducer {}

/// A producer id handed out by a broker group, with the token that proves
/// ownership of it (sent with every stamped request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerIdentity {
    /// The id: never handed out twice by a data directory or a broker
    /// group, also across power loss and failover.
    pub producer_id: u64,
    /// A random secret drawn with the id; a stamp with another token is
    /// refused (`PRODUCER_FENCED`).
    pub token: u64,
    /// How long the broker remembers an id nobody uses (ms): a producer
    /// idle longer gets `UNKNOWN_PRODUCER_ID` and asks for a new one.
    pub expiry_ms: u64,
}

/// The idempotence stamp of a send or a prepare: which producer, and where
/// in its sequence for that queue (prepares: one sequence per producer
/// for all its prepares on the broker).
///
/// Also read and written without serde, in `fast.rs`: a change to its
/// fields or their serde attributes changes that code too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProducerStamp {
    /// From [`ProducerIdentity::producer_id`].
    pub producer_id: u64,
    /// From [`ProducerIdentity::token`].
    pub token: u64,
    /// The sequence number of the first message: 0 for the producer's first
    /// send to a queue, then one more per message.
    pub sequence: u64,
}

/// How a send was acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SendStatus {
    /// Stored; under sync flush, also fsynced.
    SendOk,
    /// Stored in the page cache but the fsync did not finish in time (sync flush only).
    FlushDiskTimeout,
    /// Stored on the master, but too few in-sync slaves confirmed it within
    /// the replication timeout (sync replication only).
    FlushSlaveTimeout,
    /// Stored on the master only: no slave was available (sync replication only).
    SlaveNotAvailable,
}

impl SendStatus {
    /// `SEND_OK`, `FLUSH_DISK_TIMEOUT`, `FLUSH_SLAVE_TIMEOUT`, `SLAVE_NOT_AVAILABLE`.
    pub fn name(self) -> &'static str {
        match self {
            SendStatus::SendOk => "SEND_OK",
            SendStatus::FlushDiskTimeout => "FLUSH_DISK_TIMEOUT",
            SendStatus::FlushSlaveTimeout => "FLUSH_SLAVE_TIMEOUT",
            SendStatus::SlaveNotAvailable => "SLAVE_NOT_AVAILABLE",
        }
    }
}

/// The answer to a send.
///
/// Also read and written without serde, in `fast.rs`: a change to its
/// fields or their serde attributes changes that code too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendResult {
    /// Status of the whole request.
    pub status: SendStatus,
    /// The queue written.
    pub queue: u32,
    /// Queue offset of the first message; the batch's messages follow
    /// contiguously. For a delayed message, its place in the broker's delay
    /// index instead: its queue offset is known only once it is delivered.
    pub first_offset: u64,
    /// The ids stored, in order.
    pub msg_ids: Vec<MsgId>,
    /// An idempotent send seen before: nothing was stored now, and this is
    /// the result the first one got.
    #[serde(default)]
    pub duplicate: bool,
}

/// Read a queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullRequest {
    /// Topic name.
    pub topic: String,
    /// Queue id.
    pub queue: u32,
    /// First queue offset wanted.
    pub offset: u64,
    /// At most this many messages.
    pub max_messages: u32,
    /// When nothing is there, wait up to this long for a message to arrive.
    pub max_wait_ms: u64,
    /// Only messages whose tag hash ([`crate::tag_hash`]) is one of these
    /// (at most 64); empty: every message.
    #[serde(default)]
    pub tag_filter: Vec<u64>,
    /// A group member reading a queue assigned to it: refused with
    /// `QUEUE_NOT_OWNED` once the queue belongs to another member.
    #[serde(default)]
    pub owner: Option<QueueOwner>,
    /// The broker run ([`PullResult::epoch`]) that answered the reader's
    /// last pull of this queue; 0: none yet.
    #[serde(default)]
    pub epoch: u64,
    /// The queue offset and id of the last message the reader got from
    /// this queue. When `epoch` is an earlier run, the broker checks that
    /// this message still stands there; if not (it came back with its log
    /// cut short and written again), it answers with `next_offset` at that
    /// offset, below the pull's, so that the reader goes back.
    #[serde(default)]
    pub after: Option<(u64, MsgId)>,
    /// An operator's look at the queue (`txmq dlq list`), not a consumer's
    /// read: not counted as messages out, and allowed to an admin as a
    /// lookup by offset is (without an owner only).
    #[serde(default)]
    pub browse: bool,
}

/// Messages read from a queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullResult {
    /// Messages from the requested offset on (possibly none).
    pub messages: Vec<StoredMessage>,
    /// Where to pull next.
    pub next_offset: u64,
    /// Smallest offset still stored.
    pub min_offset: u64,
    /// One past the last offset stored.
    pub max_offset: u64,
    /// This broker run: changes at every start.
    #[serde(default)]
    pub epoch: u64,
    /// Which topic of this name the messages belong to: 0 for one never
    /// deleted here, else the log position of its last delete (a topic
    /// made again under a deleted one's name is a new topic). A commit
    /// names it ([`CommitOffset::topic_generation`]) so that an offset
    /// read from the old topic never lands in the new one.
    #[serde(default)]
    pub topic_generation: u64,
}

/// Store a group's offset: the next offset it will consume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitOffset {
    /// Consumer group.
    pub group: String,
    /// Topic name.
    pub topic: String,
    /// Queue id.
    pub queue: u32,
    /// The next offset the group will read.
    pub offset: u64,
    /// A group member committing a queue assigned to it: refused with
    /// `QUEUE_NOT_OWNED` once the queue belongs to another member.
    #[serde(default)]
    pub owner: Option<QueueOwner>,
    /// Only move the offset forward: an offset at or below the committed
    /// one is answered OK and not written (a slave handing the master the
    /// commits it kept while the master was away).
    #[serde(default)]
    pub forward_only: bool,
    /// The topic the offset was read from ([`PullResult::topic_generation`]):
    /// refused with `UNKNOWN_TOPIC`, nothing stored, when the topic was
    /// deleted since (and maybe made again, offsets from 0). `None`: not
    /// checked (an operator's reset, or a client that does not say).
    #[serde(default)]
    pub topic_generation: Option<u64>,
}

/// Who reads a queue: a member of a clustering consumer group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueOwner {
    /// Consumer group.
    pub group: String,
    /// The member's client id.
    pub client_id: String,
}

/// Ask for a group's offset and the queue's bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryOffset {
    /// Consumer group.
    pub group: String,
    /// Topic name.
    pub topic: String,
    /// Queue id.
    pub queue: u32,
    /// Also asks for the first offset stored at or after this time (ms
    /// since the epoch, the broker's clock): where a consumer that reads
    /// "from last", started then, begins a queue it meets later
    /// ([`QueueOffsets::since_offset`]).
    #[serde(default)]
    pub stored_since_ms: Option<u64>,
}

/// A group's position on a queue and the queue's bounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueOffsets {
    /// The group's committed offset, if it ever committed one.
    pub committed: Option<u64>,
    /// Smallest offset still stored.
    pub min_offset: u64,
    /// One past the last offset stored.
    pub max_offset: u64,
    /// With [`QueryOffset::stored_since_ms`]: the first offset stored at
    /// or after that time (`max_offset` when none is).
    #[serde(default)]
    pub since_offset: Option<u64>,
    /// Which topic of the name these are of ([`PullResult::topic_generation`]):
    /// a reader starting here compares its first pull's answer with it.
    #[serde(default)]
    pub topic_generation: u64,
}

/// One half message of a transaction and the queue it is meant for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HalfMessage {
    /// The real queue the message goes to when committed.
    pub queue: u32,
    /// The message, with its real topic.
    pub message: Message,
}

/// Prepare a transaction: one or several half messages, any topics of this broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareTransaction {
    /// The producer group whose live members answer check-backs.
    pub producer_group: String,
    /// The messages, stored invisibly and atomically.
    pub messages: Vec<HalfMessage>,
    /// Age before the first check-back, overriding the broker's transaction timeout.
    pub first_check_delay_ms: Option<u64>,
    /// A token the client draws once per transaction and keeps across its
    /// own retries of this prepare: a repeated prepare with the same first
    /// msg id and token is answered with the transaction it made; the same
    /// msg id with another token is refused (`DUPLICATE_MSG_ID`), never
    /// merged. `None` (older clients): the stored content decides.
    #[serde(default)]
    pub attempt: Option<u64>,
    /// Idempotence, as for a send: a retried prepare with the same stamp is
    /// answered with the transaction it made; the stamp also names the
    /// transaction in [`EndTransaction::producer`].
    #[serde(default)]
    pub producer: Option<ProducerStamp>,
    /// Consumer offsets committed with the transaction (consume, transform,
    /// produce): on commit, in the same atomic log append as the visible
    /// messages; on rollback, not at all. Queues of this broker only.
    #[serde(default)]
    pub offsets: Vec<TxOffset>,
}

/// A consumer group's offset committed as part of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxOffset {
    /// The consumer group.
    pub group: String,
    /// The consumed topic.
    pub topic: String,
    /// The consumed queue (of this broker).
    pub queue: u32,
    /// The next offset to consume, committed with the transaction.
    pub offset: u64,
    /// The group's committed offset the transaction read from: when set,
    /// the commit applies only if the group's offset is still this one
    /// (else the transaction is rolled back: `OFFSET_CONFLICT`), so two
    /// transactions made from the same input never both commit. `None`:
    /// committed unconditionally.
    #[serde(default)]
    pub expected: Option<u64>,
}

/// A prepared transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prepared {
    /// The transaction id, unique on this broker.
    pub tx_id: u64,
    /// Status of the prepare (durability as for a send).
    pub status: SendStatus,
    /// A retried idempotent prepare: nothing was stored now; this is the
    /// transaction the first one made.
    #[serde(default)]
    pub duplicate: bool,
}

/// How a transaction ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxAction {
    /// Make the messages visible.
    Commit,
    /// Drop the messages.
    Rollback,
}

/// Who ends a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxSource {
    /// The producer, after its local transaction.
    Producer,
    /// An operator, by hand (may end parked transactions).
    Operator,
}

/// End a transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndTransaction {
    /// The transaction.
    pub tx_id: u64,
    /// Commit or roll back.
    pub action: TxAction,
    /// Producer or operator.
    pub source: TxSource,
    /// The transaction's first msg id, when the caller knows it: a
    /// transaction id that names a transaction with another first message
    /// is answered `UNKNOWN_TRANSACTION` instead of ending it.
    #[serde(default)]
    pub msg_id: Option<MsgId>,
    /// The stamp of the prepare that made the transaction, when it was
    /// idempotent: a transaction id whose prepare had another stamp is
    /// answered `UNKNOWN_TRANSACTION` (this replaces the msg id match).
    #[serde(default)]
    pub producer: Option<ProducerStamp>,
}

/// The state of an ended transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxState {
    /// Waiting for commit or rollback.
    Prepared,
    /// Committed: its messages are visible.
    Committed,
    /// Rolled back: its messages were dropped.
    RolledBack,
    /// Checked the maximum number of times without an answer; waits for an operator.
    Parked,
}

impl TxState {
    /// `prepared`, `committed`, `rolled_back`, `parked`.
    pub fn name(self) -> &'static str {
        match self {
            TxState::Prepared => "prepared",
            TxState::Committed => "committed",
            TxState::RolledBack => "rolled_back",
            TxState::Parked => "parked",
        }
    }
}

/// The answer to [`EndTransaction`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Ended {
    /// The transaction's state now.
    pub state: TxState,
    /// True when it had already ended this way (a repeated end; nothing was written).
    pub already: bool,
    /// Durability of the end, as for a send.
    pub status: SendStatus,
}

impl Ended {
    /// The transaction is `state` now, `already` so before this end, and
    /// the end is stored with `status`.
    pub fn new(state: TxState, already: bool, status: SendStatus) -> Ended {
        Ended {
            state,
            already,
            status,
        }
    }
}

/// A producer's answer to a check-back (and the result of a local transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxResolution {
    /// Commit it.
    Commit,
    /// Roll it back.
    Rollback,
    /// Not known yet: ask again later.
    Unknown,
}

impl TxResolution {
    /// `commit`, `rollback`, `unknown`.
    pub fn name(self) -> &'static str {
        match self {
            TxResolution::Commit => "commit",
            TxResolution::Rollback => "rollback",
            TxResolution::Unknown => "unknown",
        }
    }
}

/// Broker -> producer: what became of this transaction?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckTransaction {
    /// The transaction.
    pub tx_id: u64,
    /// The broker asking.
    pub broker_name: String,
    /// The producer group.
    pub producer_group: String,
    /// The transaction's messages.
    pub messages: Vec<Message>,
    /// Checks sent before this one.
    pub checks: u32,
    /// How long the broker waits for the answer (ms); an answer later than
    /// that is thrown away, so the producer answers within it or not at
    /// all. 0: not said (an older broker).
    #[serde(default)]
    pub timeout_ms: u64,
}

/// The producer's answer to a check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckAnswer {
    /// Commit, roll back, or unknown.
    pub resolution: TxResolution,
}

/// List pending and parked transactions, the oldest first, those the
/// filters keep (all of them without filters).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListTransactions {
    /// Only transactions in this state: [`TxState::Prepared`] (being
    /// checked back) or [`TxState::Parked`].
    #[serde(default)]
    pub state: Option<TxState>,
    /// Only this producer group's.
    #[serde(default)]
    pub group: Option<String>,
    /// Only those prepared more than this many milliseconds ago.
    #[serde(default)]
    pub older_than_ms: Option<u64>,
}

/// A transaction not yet ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxInfo {
    /// The transaction id.
    pub tx_id: u64,
    /// The messages' ids.
    pub msg_ids: Vec<MsgId>,
    /// The topics of its messages (deduplicated).
    pub topics: Vec<String>,
    /// The producer group.
    pub producer_group: String,
    /// Milliseconds since it was prepared (broker clock).
    pub age_ms: u64,
    /// Check-backs sent.
    pub checks: u32,
    /// The last check's answer, if any.
    pub last_check: Option<TxResolution>,
    /// Why the last check could not be made or failed, if it did.
    pub last_error: Option<String>,
    /// Prepared or parked.
    pub state: TxState,
}

/// Transaction counters of a broker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TxCounters {
    /// Transactions prepared since start.
    pub prepared: u64,
    /// Committed since start.
    pub committed: u64,
    /// Rolled back since start.
    pub rolled_back: u64,
    /// Check-backs sent since start.
    pub checks_sent: u64,
    /// Parked since start.
    pub parked: u64,
    /// Pending (prepared or parked) now.
    pub pending: u64,
}

/// The answer to [`ListTransactions`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionList {
    /// The broker's name.
    pub broker_name: String,
    /// Pending and parked transactions the request's filters keep, oldest
    /// first; at most the broker's list limit of them (1000).
    pub transactions: Vec<TxInfo>,
    /// Counters.
    pub counters: TxCounters,
    /// How many transactions the filters keep in all: more than
    /// `transactions` holds when the list was cut at its limit.
    #[serde(default)]
    pub matching: u64,
}

/// Ask a broker for its store counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GetStoreStats {}

/// A broker's store counters since it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoreStats {
    /// The broker's name.
    pub broker_name: String,
    /// `async` or `sync`.
    pub flush: String,
    /// Records appended to the commit log (messages, half messages, markers, offsets).
    pub records: u64,
    /// Bytes appended to the commit log.
    pub bytes: u64,
    /// `pwrite` calls that appended them.
    pub writes: u64,
    /// fdatasync rounds of the commit log (group commits under sync flush).
    pub fdatasyncs: u64,
}

/// Checks a topic name: 1 to 127 characters of `A-Z a-z 0-9 - _ . %`.
///
/// # Errors
/// A message saying what is wrong with the name.
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("topic name is empty".into());
    }
    if name == "." || name == ".." {
        return Err(format!("topic name {name:?} is reserved"));
    }
    if name.len() > 127 {
        return Err(format!(
            "topic name is {} characters long; at most 127",
            name.len()
        ));
    }
    check_name_chars("topic", name)
}

/// The longest consumer group name: its retry and dead-letter topics
/// (`%RETRY%NAME`, `%DLQ%NAME`) are topics, of at most 127 characters.
pub const MAX_CONSUMER_GROUP_LEN: usize = 127 - RETRY_TOPIC_PREFIX.len();

/// Checks the name of a consumer group whose retry and dead-letter topics
/// are made: 1 to [`MAX_CONSUMER_GROUP_LEN`] characters of a topic name's
/// `A-Z a-z 0-9 - _ . %`, not starting with `%RETRY%` or `%DLQ%`.
///
/// # Errors
/// A message saying what is wrong with the name.
pub fn validate_group_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("group name is empty".into());
    }
    check_name_chars("group", name)?;
    if let Some(prefix) = [RETRY_TOPIC_PREFIX, DLQ_TOPIC_PREFIX]
        .into_iter()
        .find(|p| name.starts_with(p))
    {
        return Err(format!(
            "group name {name:?} starts with {prefix}, which names a group's retry or dead-letter topic"
        ));
    }
    if name.len() > MAX_CONSUMER_GROUP_LEN {
        return Err(format!(
            "group name is {} characters long; at most {MAX_CONSUMER_GROUP_LEN} (a consumer group's retry topic, %RETRY%NAME, is a topic name)",
            name.len()
        ));
    }
    Ok(())
}

fn check_name_chars(what: &str, name: &str) -> Result<(), String> {
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '%')))
    {
        Some(c) => Err(format!(
            "{what} name {name:?} contains {c:?}; allowed are A-Z a-z 0-9 - _ . %"
        )),
        None => Ok(()),
    }
}

/// A topic a consumer subscribes to, with its tag expression.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// Topic name.
    pub topic: String,
    /// `*` or `a || b || ...`.
    pub expression: String,
}

/// A queue of a topic on the broker addressed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QueueRef {
    /// Topic name.
    pub topic: String,
    /// Queue id.
    pub queue: u32,
}

/// A consumer's heartbeat to one broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Consumer group.
    pub group: String,
    /// The consumer's id, unique within the group.
    pub client_id: String,
    /// Its subscriptions.
    pub subscriptions: Vec<Subscription>,
    /// Broadcasting: every member reads every queue (no assignment).
    pub broadcast: bool,
    /// Queues of this broker the consumer still reads or has messages in
    /// flight for. A queue moves to another member only once its holder
    /// stops listing it (or dies).
    pub held: Vec<QueueRef>,
}

/// The answer to a [`Heartbeat`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatOk {
    /// The queues of this broker the consumer owns now.
    pub assigned: Vec<QueueRef>,
    /// The broker forgets a member after this long without a heartbeat;
    /// heartbeat well within it.
    #[serde(default)]
    pub expiry_ms: u64,
    /// The broker had expired this member (no heartbeat within the expiry,
    /// or not back for its reserved queues in time): others may have read
    /// its queues past where its readers stand, so it gives them up without
    /// committing and reads them again from the group's committed offsets.
    #[serde(default)]
    pub expired: bool,
}

/// A consumer leaves its group on one broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaveGroup {
    /// Consumer group.
    pub group: String,
    /// The consumer's id.
    pub client_id: String,
}

/// The group changed: heartbeat to get the new assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotifyRebalance {
    /// Consumer group.
    pub group: String,
}

/// Hand a consumed message back for redelivery to the group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendBack {
    /// Consumer group.
    pub group: String,
    /// Where the message is stored in this broker's commit log.
    pub log_offset: u64,
    /// Wait this long before redelivering; `None`: the broker's back-off for
    /// the attempt.
    pub delay_ms: Option<u64>,
    /// After this many redeliveries the message goes to the dead-letter topic.
    pub max_reconsume_times: u32,
    /// Straight to the dead-letter topic.
    pub dead_letter: bool,
    /// The message's id: the broker refuses (`OFFSET_OUT_OF_RANGE`) when
    /// the record at `log_offset` is another message (the log was cut short
    /// and written again).
    #[serde(default)]
    pub msg_id: Option<MsgId>,
    /// The message itself, as the consumer received it, for when its record
    /// is gone (retention, or a log cut short): the broker hands this back
    /// instead of reading `log_offset`. RocketMQ's consumer sends such a
    /// message to the retry topic itself.
    #[serde(default)]
    pub message: Option<Box<StoredMessage>>,
}

/// Where a handed-back message went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SentBack {
    /// The topic it was written to (the group's retry or dead-letter topic).
    pub topic: String,
    /// Its reconsume count from now on.
    pub reconsume_times: u32,
    /// When it is delivered again, ms since the epoch (0 for the dead-letter topic).
    pub deliver_at: u64,
}

/// List consumer groups.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListGroups {}

/// Groups a broker knows (with live members or committed offsets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupList {
    /// The broker's name.
    pub broker_name: String,
    /// Sorted by name.
    pub groups: Vec<GroupSummary>,
}

/// One group on one broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSummary {
    /// Group name.
    pub group: String,
    /// Live members.
    pub members: u32,
    /// Topics it has offsets for or subscribes to.
    pub topics: Vec<String>,
}

/// Ask for a group's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GetGroupState {
    /// Group name.
    pub group: String,
}

/// A group on one broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupState {
    /// The broker's name.
    pub broker_name: String,
    /// Group name.
    pub group: String,
    /// Live members, sorted by id.
    pub members: Vec<MemberInfo>,
    /// One entry per queue the group subscribes to or has an offset for.
    pub queues: Vec<GroupQueue>,
}

/// A live member of a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The consumer's id.
    pub client_id: String,
    /// Its address as the broker sees it.
    pub addr: String,
    /// Broadcasting member.
    pub broadcast: bool,
    /// Its subscriptions.
    pub subscriptions: Vec<Subscription>,
    /// Milliseconds since its last heartbeat.
    pub last_heartbeat_ms_ago: u64,
}

/// A group's position on one queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupQueue {
    /// Topic name.
    pub topic: String,
    /// Queue id.
    pub queue: u32,
    /// The member that owns it (clustering), if any.
    pub owner: Option<String>,
    /// The committed offset, if any.
    pub committed: Option<u64>,
    /// One past the last offset stored.
    pub max_offset: u64,
    /// Messages not yet consumed: max offset minus committed (or minus the
    /// first stored offset without a commit).
    pub lag: u64,
    /// Nobody owns the queue, and it waits this many more milliseconds for
    /// a reader the broker may have lost track of (the broker restarted,
    /// or the reader's connection closed) before another member gets it;
    /// `None`: owned, or free for whoever the assignment gives it to.
    #[serde(default)]
    pub waiting_ms: Option<u64>,
}

/// Where [`ResetOffset`] moves the offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OffsetTarget {
    /// The first message still stored.
    First,
    /// After the last message stored.
    Last,
    /// The first message stored at or after this time (ms since the epoch).
    Timestamp(u64),
}

/// Move a group's committed offsets of every queue of a topic on this broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResetOffset {
    /// Group name.
    pub group: String,
    /// Topic name.
    pub topic: String,
    /// Where to.
    pub to: OffsetTarget,
}

/// The offsets after a reset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OffsetsReset {
    /// The broker's name.
    pub broker_name: String,
    /// (queue id, new committed offset), by queue.
    pub queues: Vec<(u32, u64)>,
}

/// Parses a tag expression: `*` (or empty) means every tag, else tags
/// separated by `||`. Returns the tags, or `None` for every tag.
///
/// # Errors
/// An empty tag between separators.
pub fn parse_tag_expression(expr: &str) -> Result<Option<Vec<String>>, String> {
    let expr = expr.trim();
    if expr.is_empty() || expr == "*" {
        return Ok(None);
    }
    let mut tags = Vec::new();
    for t in expr.split("||") {
        let t = t.trim();
        if t.is_empty() || t == "*" {
            return Err(format!(
                "tag expression {expr:?} is not `*` or `tag || tag ...`"
            ));
        }
        tags.push(t.to_string());
    }
    tags.sort();
    tags.dedup();
    Ok(Some(tags))
}

#[cfg(test)]
mod frame_size_tests {
    use crate::{Frame, Request, Response, WireError};

    /// A frame is moved whole several times between the socket and its
    /// handler, on both sides: small, each move is a few register copies;
    /// past 128 bytes it becomes a `memcpy` call (about fifteen per send on
    /// the broker, and as many on the client, before the large kinds were
    /// boxed). A request or answer kind that makes these grow goes behind
    /// `box` in the `requests!` table.
    #[test]
    fn frames_stay_small_enough_to_move_in_registers() {
        use std::mem::size_of;
        assert!(size_of::<Request>() <= 72, "{}", size_of::<Request>());
        assert!(size_of::<Result<Response, WireError>>() <= 64);
        assert!(size_of::<Frame>() <= 80, "{}", size_of::<Frame>());
    }
}

#[cfg(test)]
mod tag_expression_tests {
    use super::parse_tag_expression;

    #[test]
    fn star_and_lists() {
        assert_eq!(parse_tag_expression("*").unwrap(), None);
        assert_eq!(parse_tag_expression(" ").unwrap(), None);
        assert_eq!(
            parse_tag_expression("b || a||b").unwrap(),
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert!(parse_tag_expression("a || ").is_err());
        assert!(parse_tag_expression("a || *").is_err());
    }
}

/// Slave -> master: the commit log from `from`, up to `max_bytes`, waiting
/// up to `wait_ms` for data when there is none yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaFetch {
    /// The broker group the slave belongs to (must be the master's).
    pub broker_name: String,
    /// The slave's own address (for `txmq cluster` and logs).
    pub addr: String,
    /// The slave's log end: where the data should start (the master may
    /// answer from a later position: the start of its next segment).
    pub from: u64,
    /// The last record the slave holds below `from`, for the master to check
    /// that both logs agree there; `None` when the slave's log is empty.
    pub last_record: Option<RecordRef>,
    /// At most this many bytes of data in the answer.
    pub max_bytes: u32,
    /// How long the master may hold the request when it has no data.
    pub wait_ms: u32,
    /// The slave's commit-log segment size (must equal the master's).
    pub segment_size: u64,
    /// The version of the master's topic table the slave holds (0: none).
    pub topics_version: u64,
    /// The epoch of the master the slave follows, as the controller told it
    /// (0: no controller). A master at another epoch refuses the fetch
    /// with `STALE_EPOCH`.
    #[serde(default)]
    pub epoch: u64,
    /// The last epoch in the slave's epoch file: the answer carries the
    /// master's epochs after it.
    #[serde(default)]
    pub last_epoch: u64,
}

/// Where an epoch's master began writing: its first log position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochStart {
    /// The epoch.
    pub epoch: u64,
    /// The log position its master began writing at.
    pub start: u64,
}

/// Slave -> master: where does your history of `epoch` end?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochEndQuery {
    /// The broker group (must be the master's).
    pub broker_name: String,
    /// The slave's last epoch.
    pub epoch: u64,
}

/// Answer to [`EpochEndQuery`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochEnd {
    /// The largest epoch of the master's history not above the one asked
    /// about (0: none, the history before the first epoch).
    pub epoch: u64,
    /// Where that epoch ends in the master's log: the start of its next
    /// epoch, or the master's log end.
    pub end: u64,
}

/// A record by its log position and checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordRef {
    /// Log position of its first byte.
    pub pos: u64,
    /// Its stored CRC32C.
    pub crc: u32,
}

/// Commit-log bytes, whole records, from `pos`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaData {
    /// Log position of the first byte of `data` (the fetch's `from`, or the
    /// start of a later segment when the log continues there).
    pub pos: u64,
    /// Whole records, exactly as in the master's log; empty after a wait
    /// that found nothing new.
    pub data: bytes::Bytes,
    /// The master's log end when it answered.
    pub master_end: u64,
    /// The master's topic table, when its version differs from the fetch's.
    pub topics: Option<(u64, Vec<TopicConfig>)>,
    /// How far every in-sync replica holds the log (never truncated by a
    /// failover): the slave's checkpoint does not go past it.
    #[serde(default)]
    pub confirmed: u64,
    /// The master's epochs after the fetch's `last_epoch`.
    #[serde(default)]
    pub epochs: Vec<EpochStart>,
}

/// Slave -> master: the slave holds the log up to `acked` (written, or
/// fsynced under `--flush sync`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaAck {
    /// One past the last byte the slave holds.
    pub acked: u64,
}

/// Ask a broker about its replication.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GetReplication {}

/// A broker's replication state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicationInfo {
    /// Broker (group) name.
    pub broker_name: String,
    /// Its role.
    pub role: BrokerRole,
    /// Its address.
    pub addr: String,
    /// Its commit-log end.
    pub log_end: u64,
    /// The epoch it is master of, or the epoch of the master it follows
    /// (0: not run by a controller).
    #[serde(default)]
    pub epoch: u64,
    /// `sync` or `async` (a master's setting).
    pub replication: String,
    /// Replicas (the master counts) that must hold a record under sync replication.
    pub min_insync_replicas: u32,
    /// On a slave: the master it replicates from, when known.
    pub master_addr: Option<String>,
    /// On a slave: the master's log end as last heard.
    pub master_end: Option<u64>,
    /// On a slave: why it stopped replicating, when it did (a diverged log).
    pub error: Option<String>,
    /// On a master: its slaves.
    pub replicas: Vec<ReplicaInfo>,
    /// On a master: replication frames (answers with data) sent since it started.
    #[serde(default)]
    pub shipped_frames: u64,
    /// On a master: records in them.
    #[serde(default)]
    pub shipped_records: u64,
    /// On a master: bytes of log in them.
    #[serde(default)]
    pub shipped_bytes: u64,
}

/// One slave as its master sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// The slave's address.
    pub addr: String,
    /// How far it holds the log.
    pub acked: u64,
    /// Bytes of the master's log it does not hold yet.
    pub lag_bytes: u64,
    /// Whether it counts toward `--min-insync-replicas`.
    pub in_sync: bool,
    /// Milliseconds since it was last heard from.
    pub last_seen_ms_ago: u64,
}

/// Broker -> controller: alive, and asking for its group's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControllerHeartbeat {
    /// Cluster name.
    pub cluster: String,
    /// The broker group.
    pub broker_name: String,
    /// The broker's address (its identity in the group).
    pub addr: String,
    /// The epoch it is master of now (0: it is not a master).
    pub master_epoch: u64,
    /// Its commit-log end (an election prefers the longest in-sync log).
    pub log_end: u64,
    /// The group state version it knows: the controller answers at once
    /// when its own differs, or else after `wait_ms` or a change.
    pub known_version: u64,
    /// How long the controller may hold the answer.
    pub wait_ms: u32,
}

/// A broker group as the controller decided it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BrokerGroupState {
    /// The broker group.
    pub broker_name: String,
    /// The master's address (none before the first election, or while no
    /// in-sync replica is alive to elect).
    pub master: Option<String>,
    /// The master's epoch: raised by every election.
    pub epoch: u64,
    /// The in-sync set (addresses, the master's included): only these may
    /// be elected, and a sync write is acknowledged once all hold it.
    pub in_sync: Vec<String>,
    /// Every replica the controller has heard from, with its liveness (the
    /// controller leader's view).
    pub replicas: Vec<ControllerReplica>,
    /// Raised on every change of the group's state.
    pub version: u64,
    /// A planned switch in progress: the replica to elect once the master
    /// drained.
    pub draining: Option<String>,
    /// The controller's `--master-expiry` in ms: a master that has not
    /// heard back from the controller for this long takes no writes.
    pub master_expiry_ms: u64,
}

/// A replica as the controller sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControllerReplica {
    /// Its address.
    pub addr: String,
    /// Heartbeating now.
    pub alive: bool,
    /// Milliseconds since its last heartbeat (`u64::MAX`: never, on this leader).
    pub last_heartbeat_ms_ago: u64,
    /// Its log end, as last reported.
    pub log_end: u64,
}

/// Master -> controller: set the group's in-sync set. Refused with
/// `STALE_EPOCH` unless `master` and `epoch` are the group's current ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlterInSync {
    /// The broker group.
    pub broker_name: String,
    /// The master asking.
    pub master: String,
    /// Its epoch.
    pub epoch: u64,
    /// The new in-sync set (contains the master).
    pub in_sync: Vec<String>,
}

/// Admin -> controller: elect a new master of a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ElectMaster {
    /// The broker group.
    pub broker_name: String,
    /// The replica to elect (it must be alive and in sync); `None`: any
    /// live in-sync replica other than the master.
    pub replica: Option<String>,
}

/// Master -> controller: drained for the planned switch at `epoch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MasterDrained {
    /// The broker group.
    pub broker_name: String,
    /// The master.
    pub master: String,
    /// Its epoch.
    pub epoch: u64,
}

/// Ask for the controller's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GetControllerInfo {}

/// The controller as one member sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControllerInfo {
    /// The answering member's id.
    pub id: u64,
    /// The current Raft leader's id, when known.
    pub leader_id: Option<u64>,
    /// The leader's controller address, when known.
    pub leader_addr: Option<String>,
    /// The current Raft term.
    pub term: u64,
    /// Every member: (id, controller address).
    pub members: Vec<(u64, String)>,
    /// Every broker group's state, sorted by name.
    pub groups: Vec<BrokerGroupState>,
}

/// Which Raft message a [`RaftRpc`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RaftRpcKind {
    /// openraft's `AppendEntriesRequest`.
    AppendEntries,
    /// openraft's `VoteRequest`.
    Vote,
    /// openraft's `InstallSnapshotRequest`.
    InstallSnapshot,
}

/// Controller -> controller: one Raft message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RaftRpc {
    /// The message kind.
    pub kind: RaftRpcKind,
    /// The sender's member id.
    pub from: u64,
    /// The message, MessagePack-encoded.
    pub body: bytes::Bytes,
}

/// The answer to a [`RaftRpc`]: openraft's response (or its Raft error),
/// MessagePack-encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RaftReply {
    /// The encoded answer.
    pub body: bytes::Bytes,
}
