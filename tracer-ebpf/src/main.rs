#![no_std]
#![no_main]
// Atomic exchange and add on map values (`maps::claim_scratch`, `maps::count`): the BPF
// target has no compare-and-swap, so core offers no atomic read-modify-write types.
#![feature(core_intrinsics)]
#![allow(internal_features, reason = "core::intrinsics atomics, see above")]

mod maps;
mod probes;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
