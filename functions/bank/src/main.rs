//! The bank decision function: serves `cmd.bank.<transfer id>.transfer` until SIGTERM.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    jetfn::decision_function::<bank::Bank>().run().await?;
    Ok(())
}
