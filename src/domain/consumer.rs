//! Whose usage a chat is, for the quotas' and the consumers' table: a signed-in user by name,
//! a guest by client address (a guest's username is whatever the browser says).

use std::net::IpAddr;

use super::UserIdentity;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Consumer {
    User(String),
    /// By the client's address as rate limits key it (an IPv6 client by its network); `None`
    /// only where no address is known.
    Guest(Option<IpAddr>),
}

impl Consumer {
    pub fn of(user: &UserIdentity, client: Option<IpAddr>) -> Self {
        if user.is_guest {
            Self::Guest(client)
        } else {
            Self::User(user.username.clone())
        }
    }

    /// The key its figures are kept under: `user|{name}` or `guest|{address}`.
    pub fn key(&self) -> String {
        match self {
            Self::User(name) => format!("user|{name}"),
            Self::Guest(Some(ip)) => format!("guest|{ip}"),
            Self::Guest(None) => "guest|unknown".into(),
        }
    }

    /// What the dashboard shows: the username, or the guest's address with its host part
    /// hidden (`203.0.113.*`, `2001:db8:1:2:*`).
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
