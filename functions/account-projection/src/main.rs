//! The account read-model projection: `account-projection` runs it, `--rebuild` rebuilds it.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    jetfn::projection_function(account_projection::AccountBalances)
        .run_with_args(std::env::args().skip(1))
        .await?;
    Ok(())
}
