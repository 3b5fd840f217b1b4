//! The account command function: serves `cmd.account.<id>.<command>` until SIGTERM.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    jetfn::command_function::<account::Account>().run().await?;
    Ok(())
}
