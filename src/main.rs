fn main() -> std::process::ExitCode {
    qr::cli::main()
}
