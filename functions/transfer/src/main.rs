//! The transfer command function: serves `cmd.transfer.<id>.<command>` until SIGTERM.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    jetfn::command_function::<transfer::Transfer>()
        .run()
        .await?;
    Ok(())
}
