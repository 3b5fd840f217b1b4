//! What each account event writes to Redis, checked without servers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use account::Event;
use account_projection::AccountBalances;
use jetfn::{Projection, Recorded, RedisWrites};

fn writes(event: Event) -> Vec<String> {
    let recorded = Recorded::new(7, "alice", "", event);
    let mut writes = RedisWrites::default();
    AccountBalances.apply(&recorded, &mut writes).unwrap();
    writes.commands()
}

#[test]
fn opening_creates_the_account_ranks_it_and_counts_it() {
    assert_eq!(
        writes(Event::AccountOpened {
            owner: "Alice".into()
        }),
        [
            "HSET account:alice owner Alice",
            "HSET account:alice status open",
            "HSET account:alice balance 0",
            "ZADD accounts:open-by-balance 0 alice",
            "HINCRBY accounts:totals open_accounts 1",
            "HINCRBY account:alice version 1",
            "HSET account:alice seq 7",
        ]
    );
}

#[test]
fn a_withdrawal_lowers_balance_rank_and_total() {
    assert_eq!(
        writes(Event::MoneyWithdrawn { amount: 30 }),
        [
            "HINCRBY account:alice balance -30",
            "ZINCRBY accounts:open-by-balance -30 alice",
            "HINCRBY accounts:totals total_balance -30",
            "HINCRBY account:alice version 1",
            "HSET account:alice seq 7",
        ]
    );
}

#[test]
fn closing_marks_the_account_and_drops_it_from_the_open_set() {
    let commands = writes(Event::AccountClosed {});
    assert!(commands.contains(&"HSET account:alice status closed".to_owned()));
    assert!(commands.contains(&"ZREM accounts:open-by-balance alice".to_owned()));
    assert!(commands.contains(&"HINCRBY accounts:totals open_accounts -1".to_owned()));
}

/// Why the writes of a deposit of `amount` are refused.
fn refusal_of_a_deposit(amount: u64) -> String {
    let recorded = Recorded::new(1, "a", "MoneyDeposited", Event::MoneyDeposited { amount });
    let mut writes = RedisWrites::default();
    AccountBalances.apply(&recorded, &mut writes).unwrap();
    writes.refusal().expect("refused").to_string()
}

#[test]
fn an_amount_beyond_redis_counters_is_refused_by_the_write_helpers() {
    let refusal = refusal_of_a_deposit(u64::MAX);
    assert!(
        refusal.contains("18446744073709551615") && refusal.contains("64-bit"),
        "{refusal}"
    );
}

#[test]
fn an_amount_beyond_exact_sorted_set_scores_is_refused() {
    let refusal = refusal_of_a_deposit(1 << 53);
    assert!(
        refusal.contains("ZINCRBY") && refusal.contains("2^53"),
        "{refusal}"
    );
}
