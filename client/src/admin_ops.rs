//! [`Admin`] operations of issue 17, part C: transaction forensics,
//! dead-letter resend, topic status and delete.

use txmq_protocol::{
    DeadLettersResent, DeleteTopic, ErrorCode, GetTopicStatus, RecheckTransaction, Rechecked,
    ResendDeadLetters, ShowTransaction, TopicDeleted, TopicStatus, TxDetail,
};

use super::{Admin, BrokerAnswer};
use crate::{Error, Result};

/// Keeps the brokers' answers, leaving out those refused with `skip` (the
/// broker does not know the thing asked); another failure is returned.
fn known<T>(answers: Vec<BrokerAnswer<T>>, skip: ErrorCode) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for a in answers {
        match a.result {
            Ok(v) => out.push(v),
            Err(e) if e.code() == Some(skip) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

impl Admin {
    /// Everything the brokers know of transaction `tx_id` (one entry per
    /// broker that knows the id: ids are unique per broker only): its half
    /// messages, state, check history, or how it ended.
    ///
    /// # Errors
    /// [`Error::UnknownTransaction`] when no broker knows it;
    /// [`Error::UnknownBroker`]; a broker's failure or refusal.
    pub async fn show_transaction(
        &self,
        tx_id: u64,
        broker: Option<&str>,
    ) -> Result<Vec<TxDetail>> {
        let targets = self.targets(broker).await?;
        let all: Vec<String> = targets.iter().map(|t| t.0.clone()).collect();
        let answers = self.ask_each(targets, ShowTransaction { tx_id }).await;
        let found = known(answers, ErrorCode::UnknownTransaction)?;
        if found.is_empty() {
            return Err(Error::UnknownTransaction {
                tx_id,
                brokers: all,
            });
        }
        Ok(found)
    }

    /// As [`Admin::show_transaction`], with each broker's answer or failure
    /// apart, by broker name (`UNKNOWN_TRANSACTION` from the brokers that
    /// do not know the id; see [`Admin::list_groups_by_broker`]).
    ///
    /// # Errors
    /// As [`Admin::list_groups_by_broker`].
    pub async fn show_transaction_by_broker(
        &self,
        tx_id: u64,
        broker: Option<&str>,
    ) -> Result<Vec<BrokerAnswer<TxDetail>>> {
        let targets = self.targets(broker).await?;
        Ok(self.ask_each(targets, ShowTransaction { tx_id }).await)
    }

    /// Un-parks transaction `tx_id` and has its broker check it back now,
    /// with a fresh allowance of checks; a prepared one is checked now.
    ///
    /// # Errors
    /// [`Error::UnknownTransaction`]; [`Error::AmbiguousTransaction`] when
    /// several brokers know the id (name the broker); `TRANSACTION_COMMITTED`
    /// or `TRANSACTION_ROLLED_BACK` for an ended one.
    pub async fn recheck_transaction(&self, tx_id: u64, broker: Option<&str>) -> Result<Rechecked> {
        let found = self.show_transaction(tx_id, broker).await?;
        let [one] = found.as_slice() else {
            return Err(Error::AmbiguousTransaction {
                tx_id,
                brokers: found.into_iter().map(|d| d.broker_name).collect(),
            });
        };
        let targets = self.targets(Some(&one.broker_name)).await?;
        let (name, addr) = targets.into_iter().next().ok_or(Error::NoBroker)?;
        self.ask(&name, &addr, RecheckTransaction { tx_id }).await
    }

    /// Re-sends dead letters of a consumer group on every broker (or one):
    /// see [`ResendDeadLetters`]. One answer per broker.
    ///
    /// # Errors
    /// [`Error::UnknownBroker`]; a broker's failure or refusal (an unknown
    /// `--to` topic, say).
    pub async fn resend_dead_letters(
        &self,
        request: ResendDeadLetters,
        broker: Option<&str>,
    ) -> Result<Vec<DeadLettersResent>> {
        self.each_broker(broker, request).await
    }

    /// As [`Admin::resend_dead_letters`], with each broker's answer or
    /// failure apart, by broker name: a broker that cannot be reached (or
    /// refuses) does not hide what the others re-sent.
    ///
    /// # Errors
    /// [`Error::UnknownBroker`]; no nameserver answers.
    pub async fn resend_dead_letters_by_broker(
        &self,
        request: ResendDeadLetters,
        broker: Option<&str>,
    ) -> Result<Vec<BrokerAnswer<DeadLettersResent>>> {
        let targets = self.targets(broker).await?;
        Ok(self.ask_each(targets, request).await)
    }

    /// A topic's queues on each broker that has it: min and max offset and
    /// last store time.
    ///
    /// # Errors
    /// `UNKNOWN_TOPIC` when no broker has it; a broker's failure.
    pub async fn topic_status(
        &self,
        topic: &str,
        broker: Option<&str>,
    ) -> Result<Vec<TopicStatus>> {
        of_brokers_with_topic(self.topic_status_by_broker(topic, broker).await?)
    }

    /// As [`Admin::topic_status`], with each broker's answer or failure
    /// apart, by broker name (a broker without the topic answers
    /// `UNKNOWN_TOPIC`): a broker that cannot be reached does not hide the
    /// others' queues.
    ///
    /// # Errors
    /// [`Error::UnknownBroker`]; no nameserver answers.
    pub async fn topic_status_by_broker(
        &self,
        topic: &str,
        broker: Option<&str>,
    ) -> Result<Vec<BrokerAnswer<TopicStatus>>> {
        let targets = self.targets(broker).await?;
        let request = GetTopicStatus {
            topic: topic.to_string(),
        };
        Ok(self.ask_each(targets, request).await)
    }

    /// Deletes a topic on every broker that has it (or one): its
    /// configuration, routes, consume queues and group offsets.
    ///
    /// # Errors
    /// As [`Admin::delete_topic_by_broker`], and the first broker's failure
    /// to delete.
    pub async fn delete_topic(
        &self,
        topic: &str,
        force: bool,
        broker: Option<&str>,
    ) -> Result<Vec<TopicDeleted>> {
        of_brokers_with_topic(self.delete_topic_by_broker(topic, force, broker).await?)
    }

    /// As [`Admin::delete_topic`], with each broker's answer apart. Every
    /// broker is asked first whether it would delete the topic, and a
    /// refusal or a broker that cannot say ends it with nothing deleted
    /// anywhere: a pending transaction on one broker left the topic
    /// deleted on the others. A broker that fails between the check and
    /// the delete is the only partial outcome: its answer says so.
    ///
    /// # Errors
    /// `UNKNOWN_TOPIC` when no broker has it; `BUSY` while a transaction
    /// with a half message for it is pending on a broker (unless `force`);
    /// a broker that does not answer the check; [`Error::UnknownBroker`];
    /// no nameserver answers. Nothing is deleted then.
    pub async fn delete_topic_by_broker(
        &self,
        topic: &str,
        force: bool,
        broker: Option<&str>,
    ) -> Result<Vec<BrokerAnswer<TopicDeleted>>> {
        let targets = self.targets(broker).await?;
        let mut request = DeleteTopic {
            topic: topic.to_string(),
            force,
            check_only: true,
        };
        let checked = self.ask_each(targets, request.clone()).await;
        let mut having = Vec::new();
        let mut unknown = None;
        for a in checked {
            match a.result {
                Ok(_) => having.push((a.broker_name, a.addr)),
                Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => {
                    unknown.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        if let (true, Some(e)) = (having.is_empty(), unknown) {
            return Err(e);
        }
        request.check_only = false;
        Ok(self.ask_each(having, request).await)
    }
}

/// The answers of the brokers that have the topic: `UNKNOWN_TOPIC` only
/// when none has it, and any other failure as it is.
fn of_brokers_with_topic<T>(answers: Vec<BrokerAnswer<T>>) -> Result<Vec<T>> {
    let mut unknown = None;
    let mut out = Vec::new();
    for a in answers {
        match a.result {
            Ok(v) => out.push(v),
            Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => {
                unknown.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    match (out.is_empty(), unknown) {
        (true, Some(e)) => Err(e),
        _ => Ok(out),
    }
}
