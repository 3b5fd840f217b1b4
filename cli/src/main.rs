//! The `jetfn` command-line tool; everything lives in the `jetfn_cli` library.

fn main() -> std::process::ExitCode {
    jetfn_cli::main()
}
