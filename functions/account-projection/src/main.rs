//! The account read-model projection: `account-projection` runs it, `--rebuild` rebuilds it.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    jetfn::projection_function(account_projection::AccountBalances)
        .run()
        .await?;
    Ok(())
}
