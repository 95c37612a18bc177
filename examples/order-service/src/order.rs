//! An order, and how it travels as a txmq message: JSON in the body, the
//! order id as the message key.

use serde::{Deserialize, Serialize};
use txmq::Message;

/// Items the sample orders pick from.
const ITEMS: [&str; 5] = ["book", "lamp", "mug", "pen", "plant"];

/// An order as the service places it and the consumer applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Unique order id, e.g. `order-0007`.
    pub order_id: String,
    /// What was ordered.
    pub item: String,
    /// The price, in cents.
    pub amount_cents: i64,
}

impl Order {
    /// The `n`th sample order: id `order-NNNN`, an item and an amount that
    /// follow from `n`, so runs are reproducible.
    pub fn sample(n: u64) -> Order {
        let item = ITEMS[usize::try_from(n % ITEMS.len() as u64).unwrap_or(0)];
        let cents = 100 + (n.wrapping_mul(1_237) % 9_900);
        Order {
            order_id: format!("order-{n:04}"),
            item: item.to_string(),
            amount_cents: i64::try_from(cents).unwrap_or(i64::MAX),
        }
    }

    /// The message announcing this order on `topic`: the JSON body, with
    /// the order id as key (consumers and operators can look it up by key).
    pub fn to_message(&self, topic: &str) -> Message {
        // Serializing a struct of strings and an integer cannot fail.
        let body = serde_json::to_vec(self).unwrap_or_default();
        Message::new(topic, body)
            .with_key(self.order_id.clone())
            .with_tag("order")
    }

    /// The order a message body carries.
    ///
    /// # Errors
    /// When the body is not an order's JSON.
    pub fn from_body(body: &[u8]) -> Result<Order, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_survives_the_trip_through_a_message() {
        let order = Order::sample(7);
        assert_eq!(order.order_id, "order-0007");
        let msg = order.to_message("orders");
        assert_eq!(msg.key(), Some("order-0007"));
        assert_eq!(msg.topic(), "orders");
        assert_eq!(Order::from_body(msg.body()).ok(), Some(order));
    }

    #[test]
    fn a_body_that_is_not_an_order_is_an_error() {
        assert!(Order::from_body(b"hello").is_err());
        assert!(Order::from_body(br#"{"order_id":"x"}"#).is_err());
    }
}
