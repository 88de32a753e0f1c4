//! Blocking publishers while a resource alarm is raised, as RabbitMQ does: a connection
//! that publishes during an alarm stops being read at its next `basic.publish` (the
//! frame is held, unprocessed, and the socket is not read until the alarm clears), and
//! gets `connection.blocked` if its client asked for the notification; a connection that
//! never published keeps working, so consumers drain. When every alarm has cleared, a
//! blocked connection gets `connection.unblocked` and its held publish goes through.
//!
//! A connection that published before the alarm is told at once (RabbitMQ sends
//! `connection.blocked` to "publishing connections" when the alarm fires), but is only
//! stopped at its next publish, so its acks and other methods still flow meanwhile.
//!
//! Sans-IO: [`Throttle`] sees frames and alarm changes and says what to hold and send.

use holdfast_broker::AlarmState;
use holdfast_codec::{AMQPClass, AMQPValue, FieldTable, Frame, basic, connection};

/// One connection's blocking state.
#[derive(Debug)]
pub(crate) struct Throttle {
    /// The client advertised the `connection.blocked` capability.
    notify: bool,
    /// The connection has published since it opened.
    published: bool,
    /// We consider the connection blocked (and told it, if it wants to hear).
    blocked: bool,
    alarm: AlarmState,
}

impl Throttle {
    pub(crate) fn new(notify: bool, alarm: AlarmState) -> Self {
        Self {
            notify,
            published: false,
            blocked: false,
            alarm,
        }
    }

    /// The alarm state changed: the notice to send now, if any.
    pub(crate) fn alarm_changed(&mut self, alarm: AlarmState) -> Option<AMQPClass> {
        self.alarm = alarm;
        if alarm.any() {
            if self.published {
                return self.block();
            }
        } else if self.blocked {
            self.blocked = false;
            return self.notify.then_some(AMQPClass::Connection(
                connection::AMQPMethod::Unblocked(connection::Unblocked {}),
            ));
        }
        None
    }

    /// Whether `frame` must wait for the alarm to clear, and the notice to send now.
    pub(crate) fn hold(&mut self, frame: &Frame) -> (bool, Option<AMQPClass>) {
        if !is_publish(frame) {
            return (false, None);
        }
        self.published = true;
        if !self.alarm.any() {
            return (false, None);
        }
        (true, self.block())
    }

    fn block(&mut self) -> Option<AMQPClass> {
        if self.blocked {
            return None;
        }
        self.blocked = true;
        self.notify.then(|| {
            AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
                reason: self.alarm.reason().into(),
            }))
        })
    }
}

fn is_publish(frame: &Frame) -> bool {
    matches!(frame, Frame::Method { method, .. }
        if matches!(**method, AMQPClass::Basic(basic::AMQPMethod::Publish(_))))
}

/// Whether a client's `start-ok` properties ask for `connection.blocked` notifications.
pub(crate) fn wants_blocked_notifications(client_properties: &FieldTable) -> bool {
    match client_properties.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(capabilities)) => matches!(
            capabilities.inner().get("connection.blocked"),
            Some(AMQPValue::Boolean(true))
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: AlarmState = AlarmState {
        disk: true,
        memory: false,
    };
    const CLEAR: AlarmState = AlarmState {
        disk: false,
        memory: false,
    };

    fn publish() -> Frame {
        Frame::Method {
            channel: 1,
            method: Box::new(AMQPClass::Basic(basic::AMQPMethod::Publish(
                basic::Publish::default(),
            ))),
        }
    }

    fn ack() -> Frame {
        Frame::Method {
            channel: 1,
            method: Box::new(AMQPClass::Basic(basic::AMQPMethod::Ack(
                basic::Ack::default(),
            ))),
        }
    }

    fn is_blocked(method: Option<AMQPClass>, reason: &str) -> bool {
        matches!(method, Some(AMQPClass::Connection(connection::AMQPMethod::Blocked(b))) if b.reason.as_str() == reason)
    }

    fn is_unblocked(method: Option<AMQPClass>) -> bool {
        matches!(
            method,
            Some(AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)))
        )
    }

    #[test]
    fn a_consumer_is_never_blocked() {
        let mut throttle = Throttle::new(true, CLEAR);
        assert!(throttle.alarm_changed(DISK).is_none());
        assert!(!throttle.hold(&ack()).0);
        assert!(throttle.alarm_changed(CLEAR).is_none(), "never blocked");
    }

    #[test]
    fn a_publish_during_an_alarm_is_held_and_notified_once() {
        let mut throttle = Throttle::new(true, DISK);
        let (hold, notice) = throttle.hold(&publish());
        assert!(hold);
        assert!(is_blocked(notice, "low on disk"));
        let (hold, notice) = throttle.hold(&publish());
        assert!(hold && notice.is_none(), "one notice per blocking");
        assert!(
            throttle
                .alarm_changed(AlarmState {
                    disk: true,
                    memory: true
                })
                .is_none()
        );
        assert!(is_unblocked(throttle.alarm_changed(CLEAR)));
        assert_eq!(throttle.hold(&publish()), (false, None));
    }

    #[test]
    fn a_publishing_connection_is_told_when_the_alarm_fires() {
        let mut throttle = Throttle::new(true, CLEAR);
        assert_eq!(throttle.hold(&publish()), (false, None));
        let memory = AlarmState {
            disk: false,
            memory: true,
        };
        assert!(is_blocked(throttle.alarm_changed(memory), "low on memory"));
        assert!(!throttle.hold(&ack()).0, "acks still flow");
        assert_eq!(throttle.hold(&publish()), (true, None));
        assert!(is_unblocked(throttle.alarm_changed(CLEAR)));
    }

    #[test]
    fn without_the_capability_publishes_are_held_silently() {
        let mut throttle = Throttle::new(false, DISK);
        assert_eq!(throttle.hold(&publish()), (true, None));
        assert!(throttle.alarm_changed(CLEAR).is_none());
        assert_eq!(throttle.hold(&publish()), (false, None));
    }

    #[test]
    fn capability_detection() {
        let mut capabilities = FieldTable::default();
        capabilities.insert("connection.blocked".into(), AMQPValue::Boolean(true));
        let mut properties = FieldTable::default();
        assert!(!wants_blocked_notifications(&properties));
        properties.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
        assert!(wants_blocked_notifications(&properties));
    }
}
