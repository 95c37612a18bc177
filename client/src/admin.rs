//! [`Admin`]: create topics and look at what the nameservers know.

use txmq_protocol::{BrokerInfo, CreateTopic, Role, TopicConfig, TopicOnBroker, TopicRoute};

use crate::nameserver::NameserverClient;
use crate::pool::ConnectionPool;
use crate::{ClientConfig, Error, Result};

/// A topic created (or updated) on one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedTopic {
    /// The broker's name.
    pub broker_name: String,
    /// The broker's address.
    pub addr: String,
    /// The topic's configuration there, as the broker answered.
    pub config: TopicConfig,
}

/// Administration: topics, routes and the cluster. A cheap `Clone` handle.
#[derive(Debug, Clone)]
pub struct Admin {
    pool: ConnectionPool,
    nameservers: NameserverClient,
}

impl Admin {
    /// Connects to the first reachable nameserver of `nameservers` (each
    /// item may be a comma-separated list), with default settings.
    ///
    /// # Errors
    /// [`Error::BadArgument`] when no address is given; [`Error::Remoting`]
    /// when no nameserver can be reached.
    pub async fn connect<I, S>(nameservers: I) -> Result<Admin>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Admin::with_config(ClientConfig::with_nameservers(nameservers)).await
    }

    /// As [`Admin::connect`], with the given settings.
    ///
    /// # Errors
    /// As [`Admin::connect`].
    pub async fn with_config(config: ClientConfig) -> Result<Admin> {
        config.validate()?;
        let pool = ConnectionPool::new(&config, Role::Admin, None, None);
        let nameservers = NameserverClient::new(config.nameservers.clone(), pool.clone());
        let mut last = None;
        for addr in nameservers.addrs() {
            match pool.get(addr).await {
                Ok(_) => {
                    return Ok(Admin { pool, nameservers });
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => Error::Remoting(e),
            None => Error::BadArgument("no nameserver address given".into()),
        })
    }

    /// Creates `topic` with `queues` queues and permission bits `perm`
    /// ([`PERM_READ`](crate::PERM_READ) | [`PERM_WRITE`](crate::PERM_WRITE)),
    /// or updates it if it exists. On the broker named `broker` (a broker
    /// address is accepted too), or on every broker the nameservers know.
    /// Each broker registers the topic with the nameservers at once, so the
    /// route is visible right after.
    ///
    /// # Errors
    /// [`Error::NoBroker`] when no broker is registered;
    /// [`Error::UnknownBroker`] when `broker` names none of them;
    /// [`Error::Broker`] with the first broker's refusal (`BAD_ARGUMENT` for
    /// an invalid name or queue count, ...). Brokers before the failing one
    /// keep the topic.
    pub async fn create_topic(
        &self,
        topic: &str,
        queues: u32,
        perm: u8,
        broker: Option<&str>,
    ) -> Result<Vec<CreatedTopic>> {
        let brokers = self.nameservers.cluster().await?;
        let targets: Vec<(String, String)> = match broker {
            Some(wanted) => {
                let found = brokers
                    .iter()
                    .find(|b| b.broker_name == wanted)
                    .or_else(|| brokers.iter().find(|b| b.addr == wanted))
                    .ok_or_else(|| Error::UnknownBroker {
                        name: wanted.to_string(),
                    })?;
                vec![(found.broker_name.clone(), found.addr.clone())]
            }
            None => {
                let mut all: Vec<(String, String)> = brokers
                    .iter()
                    .map(|b| (b.broker_name.clone(), b.addr.clone()))
                    .collect();
                all.sort();
                all.dedup_by(|a, b| a.0 == b.0);
                all
            }
        };
        if targets.is_empty() {
            return Err(Error::NoBroker);
        }
        let mut created = Vec::with_capacity(targets.len());
        for (broker_name, addr) in targets {
            let request = CreateTopic {
                topic: topic.to_string(),
                queues,
                perm,
            };
            let answer = match self.pool.get(&addr).await {
                Ok(conn) => conn.call(request).await,
                Err(e) => Err(e),
            };
            let config = answer.map_err(|e| Error::at_broker(&broker_name, &addr, e))?;
            created.push(CreatedTopic {
                broker_name,
                addr,
                config,
            });
        }
        Ok(created)
    }

    /// Every topic on every broker, as the nameservers know them.
    ///
    /// # Errors
    /// [`Error::Remoting`] when no nameserver answers.
    pub async fn list_topics(&self) -> Result<Vec<TopicOnBroker>> {
        self.nameservers.topics().await
    }

    /// The route of `topic`: its brokers, their addresses, queue counts and permissions.
    ///
    /// # Errors
    /// [`Error::NoRoute`] when no broker serves it; [`Error::Remoting`] when
    /// no nameserver answers.
    pub async fn route(&self, topic: &str) -> Result<TopicRoute> {
        self.nameservers.route(topic).await
    }

    /// The brokers the nameservers know, sorted by cluster then name.
    ///
    /// # Errors
    /// [`Error::Remoting`] when no nameserver answers.
    pub async fn cluster(&self) -> Result<Vec<BrokerInfo>> {
        self.nameservers.cluster().await
    }

    /// Closes the connections.
    pub fn close(&self) {
        self.pool.close();
    }
}
