//! `turnserver`: the STUN/TURN daemon. Everything happens in
//! [`turnserver::daemon`].

fn main() -> std::process::ExitCode {
    turnserver::daemon::main()
}
