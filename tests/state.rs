//! The state store on a real analytics database keeps the same contract as its in-memory
//! twin (the unit tests run `walcast::state::contract::check` on that one).

use crate::support::Postgres;
use walcast::state::{PgState, contract, migrate};

#[tokio::test]
async fn the_analytics_database_keeps_the_state_contract() {
    let pg = Postgres::start().await;
    let mut client = pg.client("postgres").await;
    let applied = migrate(&mut client).await.unwrap();
    assert!(!applied.is_empty(), "a new database gets every migration");
    assert!(
        migrate(&mut client).await.unwrap().is_empty(),
        "a second run applies nothing"
    );
    contract::check(&mut PgState::new(&client)).await;

    // Inside a transaction the state moves with it, or not at all.
    let tx = client.transaction().await.unwrap();
    let mut state = PgState::new(&tx);
    walcast::state::StateStore::save_backfill_cursor(&mut state, "rolled-back", Some(1))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let cursor =
        walcast::state::StateStore::backfill_cursor(&mut PgState::new(&client), "rolled-back")
            .await
            .unwrap();
    assert_eq!(cursor, None);
}
