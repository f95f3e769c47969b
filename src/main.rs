fn main() -> std::process::ExitCode {
    al_chat::cli::run()
}
