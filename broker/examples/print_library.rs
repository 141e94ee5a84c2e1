//! Prints the server-side function library, e.g. to load it by hand:
//! `cargo run -q -p fleetq-broker --example print_library | redis-cli -x FUNCTION LOAD REPLACE`.
fn main() {
    print!("{}", fleetq_broker::functions::library_source());
}
