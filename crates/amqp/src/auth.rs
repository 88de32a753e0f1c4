//! SASL PLAIN and AMQPLAIN, checked against the configured users.

use std::net::IpAddr;

use amq_protocol_types::parsing::parse_field_table;
use holdfast_codec::AMQPValue;
use serde::{Deserialize, Serialize};

/// A user allowed to connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Password, compared as given.
    pub password: String,
    /// Only accepted from loopback addresses (the default `guest` user is).
    #[serde(default)]
    pub loopback_only: bool,
}

impl User {
    /// RabbitMQ's default user: `guest`/`guest`, loopback only.
    #[must_use]
    pub fn guest() -> Self {
        Self {
            name: "guest".into(),
            password: "guest".into(),
            loopback_only: true,
        }
    }
}

/// Why a login was refused (all are 403 ACCESS_REFUSED on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// A mechanism other than PLAIN or AMQPLAIN.
    UnsupportedMechanism(String),
    /// The response could not be parsed.
    Malformed,
    /// Wrong name or password.
    BadCredentials,
    /// The user may only connect from loopback.
    LoopbackOnly(String),
}

impl AuthFailure {
    /// The reply text, in RabbitMQ's words.
    #[must_use]
    pub fn text(&self, mechanism: &str) -> String {
        match self {
            AuthFailure::UnsupportedMechanism(name) => {
                format!("unsupported authentication mechanism '{name}'")
            }
            AuthFailure::LoopbackOnly(user) => {
                format!("User '{user}' can only connect via localhost")
            }
            AuthFailure::Malformed | AuthFailure::BadCredentials => format!(
                "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
            ),
        }
    }
}

fn credentials(mechanism: &str, response: &[u8]) -> Result<(String, String), AuthFailure> {
    match mechanism {
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next();
            let user = parts.next().ok_or(AuthFailure::Malformed)?;
            let password = parts.next().ok_or(AuthFailure::Malformed)?;
            Ok((
                String::from_utf8_lossy(user).into_owned(),
                String::from_utf8_lossy(password).into_owned(),
            ))
        }
        "AMQPLAIN" => {
            // The response is a field table without its length prefix.
            let mut table = Vec::with_capacity(response.len() + 4);
            table.extend_from_slice(
                &u32::try_from(response.len())
                    .map_err(|_| AuthFailure::Malformed)?
                    .to_be_bytes(),
            );
            table.extend_from_slice(response);
            let (_, table) = parse_field_table(&table[..]).map_err(|_| AuthFailure::Malformed)?;
            let text = |key: &str| match table.inner().get(key) {
                Some(AMQPValue::LongString(s)) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
                _ => None,
            };
            Ok((
                text("LOGIN").ok_or(AuthFailure::Malformed)?,
                text("PASSWORD").ok_or(AuthFailure::Malformed)?,
            ))
        }
        other => Err(AuthFailure::UnsupportedMechanism(other.to_owned())),
    }
}

/// Checks a `connection.start-ok` response; returns the user name.
///
/// # Errors
/// The [`AuthFailure`] that refuses it.
pub fn authenticate(
    users: &[User],
    mechanism: &str,
    response: &[u8],
    peer: IpAddr,
) -> Result<String, AuthFailure> {
    let (name, password) = credentials(mechanism, response)?;
    let user = users
        .iter()
        .find(|u| u.name == name && u.password == password)
        .ok_or(AuthFailure::BadCredentials)?;
    if user.loopback_only && !peer.is_loopback() {
        return Err(AuthFailure::LoopbackOnly(name));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_loopback() {
        let users = [User::guest()];
        let local = IpAddr::from([127, 0, 0, 1]);
        let remote = IpAddr::from([192, 0, 2, 1]);
        assert_eq!(
            authenticate(&users, "PLAIN", b"\0guest\0guest", local),
            Ok("guest".into())
        );
        assert_eq!(
            authenticate(&users, "PLAIN", b"\0guest\0nope", local),
            Err(AuthFailure::BadCredentials)
        );
        assert_eq!(
            authenticate(&users, "PLAIN", b"\0guest\0guest", remote),
            Err(AuthFailure::LoopbackOnly("guest".into()))
        );
        assert_eq!(
            authenticate(&users, "PLAIN", b"garbage", local),
            Err(AuthFailure::Malformed)
        );
        assert!(matches!(
            authenticate(&users, "EXTERNAL", b"", local),
            Err(AuthFailure::UnsupportedMechanism(_))
        ));
    }

    #[test]
    fn amqplain() {
        // LOGIN=S"guest", PASSWORD=S"guest" as AMQPLAIN encodes it.
        let mut response = Vec::new();
        for (key, value) in [("LOGIN", "guest"), ("PASSWORD", "guest")] {
            response.push(key.len() as u8);
            response.extend_from_slice(key.as_bytes());
            response.push(b'S');
            response.extend_from_slice(&(value.len() as u32).to_be_bytes());
            response.extend_from_slice(value.as_bytes());
        }
        let users = [User::guest()];
        assert_eq!(
            authenticate(&users, "AMQPLAIN", &response, IpAddr::from([127, 0, 0, 1])),
            Ok("guest".into())
        );
    }
}
