//! The transfer process manager: moves the money of each started transfer until SIGTERM.
//! `TRANSFER_DEADLINE_SECS` (default 30) bounds how long a transfer waits for its debit.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let manager = transfer_manager::TransferManager::from_env().map_err(anyhow::Error::msg)?;
    jetfn::process_manager_function(manager).run().await?;
    Ok(())
}
