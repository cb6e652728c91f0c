#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wedge_autopsy::fuzzing::webhook(data);
});
