//! The transfer status read model: `transfer-projection` runs it, `--rebuild` rebuilds it.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    jetfn::projection_function(transfer::status::TransferStatus)
        .run_with_args(std::env::args().skip(1))
        .await?;
    Ok(())
}
