//! [`Message`]: what the producer publishes, built with chained setters.
//!
//! Defaults are the safe ones: persistent (delivery mode 2) and mandatory (an
//! unroutable message comes back as an error instead of vanishing). The message id is
//! left empty until the producer sends it, which then assigns a UUIDv7; every retry of
//! that send reuses the id.

use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, ShortString};

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) body: Bytes,
    pub(crate) persistent: bool,
    pub(crate) mandatory: bool,
    pub(crate) headers: FieldTable,
    pub(crate) content_type: Option<String>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) expiration: Option<String>,
    pub(crate) message_id: Option<String>,
}

impl Message {
    /// A persistent, mandatory message for `exchange` ("" is the default exchange, which
    /// routes to the queue named by `routing_key`).
    #[must_use]
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        body: impl Into<Bytes>,
    ) -> Self {
        Message {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body: body.into(),
            persistent: true,
            mandatory: true,
            headers: FieldTable::default(),
            content_type: None,
            correlation_id: None,
            expiration: None,
            message_id: None,
        }
    }

    /// A message for the default exchange, routed to `queue`.
    #[must_use]
    pub fn to_queue(queue: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Self::new("", queue, body)
    }

    /// Whether the broker stores the message on disk (delivery mode 2). Default true.
    #[must_use]
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.persistent = persistent;
        self
    }

    /// Whether an unroutable message is returned (an error) rather than dropped.
    /// Default true.
    #[must_use]
    pub fn mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }

    /// Adds one header.
    #[must_use]
    pub fn header(mut self, key: &str, value: impl Into<AMQPValue>) -> Self {
        self.headers.insert(ShortString::from(key), value.into());
        self
    }

    /// Replaces all headers.
    #[must_use]
    pub fn headers(mut self, headers: FieldTable) -> Self {
        self.headers = headers;
        self
    }

    /// The `content-type` property.
    #[must_use]
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    /// The `correlation-id` property.
    #[must_use]
    pub fn correlation_id(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = Some(correlation_id.into());
        self
    }

    /// The per-message TTL (`expiration` property, milliseconds as a string in AMQP).
    #[must_use]
    pub fn expiration(mut self, expiration: std::time::Duration) -> Self {
        self.expiration = Some(expiration.as_millis().to_string());
        self
    }

    /// Sets the message id instead of letting the producer generate a UUIDv7. Use a
    /// business key (an order id, an outbox row id) to make re-sends recognisable
    /// across processes.
    #[must_use]
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.message_id = Some(id.into());
        self
    }

    /// The message id, once set by the caller or by the producer.
    #[must_use]
    pub fn id(&self) -> Option<&str> {
        self.message_id.as_deref()
    }

    /// The body.
    #[must_use]
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Sets a UUIDv7 message id if none is set, and returns the id.
    pub(crate) fn ensure_id(&mut self) -> String {
        match &self.message_id {
            Some(id) => id.clone(),
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                self.message_id = Some(id.clone());
                id
            }
        }
    }

    pub(crate) fn properties(&self) -> lapin::BasicProperties {
        let mut props = lapin::BasicProperties::default().with_delivery_mode(if self.persistent {
            2
        } else {
            1
        });
        let mut headers = self.headers.clone();
        if let Some(id) = &self.message_id {
            props = props.with_message_id(ShortString::from(id.as_str()));
            // Lets RabbitMQ's deduplication plugin key on the id too; Holdfast falls
            // back to message-id on its own.
            let key = ShortString::from("x-deduplication-header");
            if !headers.inner().contains_key(&key) {
                headers.insert(key, AMQPValue::LongString(id.as_str().into()));
            }
        }
        props = props.with_headers(headers);
        if let Some(ct) = &self.content_type {
            props = props.with_content_type(ShortString::from(ct.as_str()));
        }
        if let Some(c) = &self.correlation_id {
            props = props.with_correlation_id(ShortString::from(c.as_str()));
        }
        if let Some(e) = &self.expiration {
            props = props.with_expiration(ShortString::from(e.as_str()));
        }
        props
    }
}
