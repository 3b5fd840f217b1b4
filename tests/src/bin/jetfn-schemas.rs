//! Writes the JSON Schemas of the example functions to `schemas/` (`just schemas`).

fn main() -> anyhow::Result<()> {
    let dir = jetfn_tests::schemas::schemas_dir();
    let written = jetfn_tests::schemas::write_all(&dir)?;
    println!("wrote {written} schemas to {}", dir.display());
    Ok(())
}
