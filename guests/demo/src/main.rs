#![no_std]
#![no_main]
fn main(_boot: &'static guest_runtime::Boot) -> ! {
    guest_runtime::println!("hello");
    guest_runtime::report::finish()
}
guest_runtime::entry!(main);
