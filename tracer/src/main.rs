fn main() -> std::process::ExitCode {
    bindtrace::main()
}
