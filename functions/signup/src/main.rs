//! The signup decision function: serves `cmd.signup.<signup id>.register` until SIGTERM. Users
//! and usernames share the stream `USERS` unless `stream.name` says otherwise.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = jetfn::Config::load()?;
    config
        .stream
        .name
        .get_or_insert_with(|| signup::STREAM.to_owned());
    jetfn::decision_function::<signup::Signup>()
        .with_config(config)
        .run()
        .await?;
    Ok(())
}
