//! Whose usage a chat is, for the quotas' and the consumers' table: a signed-in user by name,
//! a guest by client address (a guest's username is whatever the browser says).

use std::net::IpAddr;

use super::UserIdentity;

/// The key a consumer's figures and quota counter are kept under: `user|{name}` for a signed-in
/// user, `guest|{address}` for a guest (by the client's address as rate limits key it; an IPv6
/// client by its network).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Consumer(String);

impl Consumer {
    pub fn of(user: &UserIdentity, client: Option<IpAddr>) -> Self {
        if !user.is_guest {
            return Self::user(&user.username);
        }
        match client {
            Some(ip) => Self(format!("guest|{ip}")),
            None => Self("guest|unknown".into()),
        }
    }

    /// A signed-in user, by name.
    pub fn user(name: &str) -> Self {
        Self(format!("user|{name}"))
    }

    pub fn key(&self) -> &str {
        &self.0
    }

    pub fn is_guest(&self) -> bool {
        self.0.starts_with("guest|")
    }

    /// What the dashboard shows of a key: the username, or the guest's address with its host
    /// part hidden (`203.0.113.*`, `2001:db8:1:2:*`).
    pub fn label(key: &str) -> (&'static str, String) {
        match key.split_once('|') {
            Some(("user", name)) => ("user", name.to_string()),
            Some(("guest", address)) => ("guest", mask(address)),
            _ => ("guest", "unknown".into()),
        }
    }
}

fn mask(address: &str) -> String {
    match address.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.*")
        }
        Ok(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}:*", s[0], s[1], s[2], s[3])
        }
        Err(_) => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_by_name_guests_by_address() {
        let user = |name: &str, is_guest| UserIdentity {
            username: name.into(),
            is_guest,
            verified: false,
        };
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            Consumer::of(&user("ana", false), Some(ip)).key(),
            "user|ana"
        );
        let guest = Consumer::of(&user("whatever", true), Some(ip));
        assert_eq!(guest.key(), "guest|203.0.113.9");
        assert!(guest.is_guest());
        assert_eq!(Consumer::of(&user("g", true), None).key(), "guest|unknown");
    }

    #[test]
    fn guests_are_shown_without_their_host_part() {
        assert_eq!(
            Consumer::label("guest|203.0.113.9"),
            ("guest", "203.0.113.*".into())
        );
        assert_eq!(
            Consumer::label("guest|2001:db8:1:2::"),
            ("guest", "2001:db8:1:2:*".into())
        );
        assert_eq!(Consumer::label("user|a|b"), ("user", "a|b".into()));
    }
}
