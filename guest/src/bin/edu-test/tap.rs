//! Test results as TAP-like lines: `ok N - what`, `not ok N - what: detail`.

use core::fmt::{self, LowerHex};

use kvm_userdev_guest::{platform, println};

pub struct Tap {
    name: &'static str,
    count: u32,
    failed: u32,
}

impl Tap {
    pub fn new(name: &'static str) -> Self {
        Tap {
            name,
            count: 0,
            failed: 0,
        }
    }

    /// Records a check; `detail` says what went wrong if it failed.
    pub fn check(&mut self, what: fmt::Arguments, passed: bool, detail: fmt::Arguments) -> bool {
        self.count += 1;
        if passed {
            println!("ok {} - {what}", self.count);
        } else {
            self.failed += 1;
            println!("not ok {} - {what}: {detail}", self.count);
        }
        passed
    }

    /// Checks that `got` is `expected`; values are printed in hex.
    pub fn eq<T: PartialEq + LowerHex>(
        &mut self,
        what: fmt::Arguments,
        expected: T,
        got: T,
    ) -> bool {
        let passed = expected == got;
        self.check(
            what,
            passed,
            format_args!("expected {expected:#x} got {got:#x}"),
        )
    }

    pub fn pass(&mut self, what: fmt::Arguments) {
        self.check(what, true, format_args!(""));
    }

    pub fn fail(&mut self, what: fmt::Arguments, detail: fmt::Arguments) {
        self.check(what, false, detail);
    }

    /// Prints the plan and the verdict, and exits with 0 if all passed.
    pub fn finish(&self) -> ! {
        println!("1..{}", self.count);
        if self.failed == 0 {
            println!("{}: PASS", self.name);
            platform::exit(0)
        }
        println!(
            "{}: FAIL ({} of {} failed)",
            self.name, self.failed, self.count
        );
        platform::exit(1)
    }
}
