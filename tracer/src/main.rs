fn main() -> std::process::ExitCode {
    bindtrace::app::main()
}
