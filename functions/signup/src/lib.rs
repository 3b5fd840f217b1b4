//! Signing up: a user is created together with the unique username it claims, in one atomic
//! append across two aggregate types: the example cross-type decision of jetfn.
//!
//! `cmd.signup.<signup id>.register {user, username}` writes `Registered` on `evt.user.<user>`
//! and `Claimed` on `evt.username.<username>`, both or neither, and only if neither aggregate
//! changed since it was read: of two signups racing for one username, exactly one is accepted.
//! Users and usernames are stored in one stream ([`STREAM`]): an atomic batch is single-stream.

use jetfn::decision::{Decision, Events, States};
use jetfn::{Aggregate, Rejection};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The stream users and usernames share (`stream.name`), unless configured otherwise.
pub const STREAM: &str = "USERS";

/// A user: registered once, with the username it claimed.
#[derive(Debug, Default)]
pub struct User {
    /// The username, once registered.
    pub username: Option<String>,
}

/// What happened to a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UserEvent {
    /// The user signed up with this username.
    Registered {
        /// The username claimed.
        username: String,
    },
}

/// A username: claimed by at most one user, ever.
#[derive(Debug, Default)]
pub struct Username {
    /// The user who claimed it.
    pub owner: Option<String>,
}

/// What happened to a username.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UsernameEvent {
    /// A user claimed the username.
    Claimed {
        /// The user id.
        user: String,
    },
}

/// Users and usernames change only through signups: they take no commands of their own.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
pub enum NoCommand {}

impl Aggregate for User {
    const NAME: &'static str = "user";
    type Command = NoCommand;
    type Event = UserEvent;

    fn decide(&self, command: NoCommand) -> Result<Vec<UserEvent>, Rejection> {
        match command {}
    }

    fn evolve(self, UserEvent::Registered { username }: &UserEvent) -> Self {
        User {
            username: Some(username.clone()),
        }
    }
}

impl Aggregate for Username {
    const NAME: &'static str = "username";
    type Command = NoCommand;
    type Event = UsernameEvent;

    fn decide(&self, command: NoCommand) -> Result<Vec<UsernameEvent>, Rejection> {
        match command {}
    }

    fn evolve(self, UsernameEvent::Claimed { user }: &UsernameEvent) -> Self {
        Username {
            owner: Some(user.clone()),
        }
    }
}

/// The signup decision over users and usernames.
#[derive(Debug)]
pub struct Signup;

/// What clients can ask of signup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Creates user `user` with the unique name `username`.
    Register {
        /// The new user's id.
        user: String,
        /// The name it claims: 3 to 32 of `a-z`, `0-9`, `_`, `-`.
        username: String,
    },
}

/// Whether `name` is a username: 3 to 32 of `a-z`, `0-9`, `_`, `-`.
fn is_username(name: &str) -> bool {
    (3..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl Decision for Signup {
    const NAME: &'static str = "signup";
    type Aggregate = (User, Username);
    type Command = Command;

    fn aggregates(Command::Register { user, username }: &Command) -> Vec<(&'static str, String)> {
        vec![
            (User::NAME, user.clone()),
            (Username::NAME, username.clone()),
        ]
    }

    fn decide(
        states: &States<'_, (User, Username)>,
        Command::Register { user, username }: Command,
    ) -> Result<Events<(User, Username)>, Rejection> {
        if !is_username(&username) {
            return Err(Rejection::new(format!(
                "username {username:?} must be 3 to 32 of a-z, 0-9, _ and -"
            )));
        }
        if states
            .get::<User>(&user)
            .is_some_and(|u| u.username.is_some())
        {
            return Err(Rejection::new(format!("user {user} already exists")));
        }
        if let Some(owner) = states
            .get::<Username>(&username)
            .and_then(|n| n.owner.as_ref())
        {
            return Err(
                Rejection::new(format!("username {username} is taken by {owner}"))
                    .with_code("username_taken"),
            );
        }
        Ok(Events::new()
            .with(
                user.clone(),
                [UserEvent::Registered {
                    username: username.clone(),
                }],
            )
            .with(username, [UsernameEvent::Claimed { user }]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetfn::testing::given_decision;

    fn register(user: &str, username: &str) -> Command {
        Command::Register {
            user: user.into(),
            username: username.into(),
        }
    }

    #[test]
    fn a_signup_registers_the_user_and_claims_the_username_together() {
        let events = given_decision::<Signup>()
            .when(register("u1", "alice"))
            .then_events();
        assert_eq!(events.aggregates(), [("user", "u1"), ("username", "alice")]);
        assert_eq!(
            events.of::<User>("u1"),
            [UserEvent::Registered {
                username: "alice".into()
            }]
        );
        assert_eq!(
            events.of::<Username>("alice"),
            [UsernameEvent::Claimed { user: "u1".into() }]
        );
    }

    #[test]
    fn a_taken_username_is_rejected() {
        given_decision::<Signup>()
            .with::<Username>("alice", [UsernameEvent::Claimed { user: "u1".into() }])
            .when(register("u2", "alice"))
            .then_rejected("username alice is taken by u1");
    }

    #[test]
    fn a_user_signs_up_once() {
        given_decision::<Signup>()
            .with::<User>(
                "u1",
                [UserEvent::Registered {
                    username: "alice".into(),
                }],
            )
            .when(register("u1", "bob"))
            .then_rejected("user u1 already exists");
    }

    #[test]
    fn usernames_are_short_lowercase_words() {
        for bad in ["al", "Alice", &"a".repeat(33)] {
            given_decision::<Signup>()
                .when(register("u1", bad))
                .then_rejected("must be 3 to 32");
        }
    }
}
