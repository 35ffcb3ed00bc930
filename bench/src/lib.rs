//! The MMIO latency benchmark: kvm-userdev against the classic exit paths and
//! plain QEMU, run inside the patched-kernel VM by `cargo xtask bench`.
//!
//! One guest payload (`guest/`'s `mmio-bench`) times each access type under
//! every [`variants`] entry; [`run`] interleaves the variants in rounds and
//! pools the samples; [`report`] turns the [`results`] into a table, a
//! markdown table and an SVG plot; [`trace`] shows where one access's time
//! goes in the kernel; [`idle`] what an idle guest costs; [`two_vcpus`] how two vCPUs at once fare. [`linux_bench`] boots an unmodified Linux guest under
//! each host and measures its console and edu driver; [`linux_report`]
//! renders those figures.

pub mod guest;
pub mod idle;
pub mod linux;
pub mod linux_bench;
pub mod linux_report;
pub mod process;
pub mod qemu;
pub mod report;
pub mod results;
pub mod run;
pub mod system;
pub mod trace;
pub mod two_vcpus;
pub mod variants;
