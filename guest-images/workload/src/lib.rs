//! The guest workload: fills guest memory with a seeded mix of duplicate, unique and zero pages,
//! verifies it, and churns it, printing machine-readable result lines.
//!
//! The binary `guest-workload` runs inside the guest (it is put in the initramfs by
//! `guest-images build`). This library holds its pure parts so that host-side tests can compute
//! exactly what a guest wrote and read its result lines:
//!
//! ```
//! use guest_workload::content::{ContentMix, ContentPlan, PAGE_SIZE};
//! use guest_workload::report::ResultLine;
//!
//! let plan = ContentPlan::new(ContentMix { unique: 0.5, zero: 0.25, ..ContentMix::default() }, 8)?;
//! assert_eq!(plan.counts().unique, 4);
//! let mut page = [0u8; PAGE_SIZE];
//! plan.fill_page(3, 0, &mut page);
//! assert!(plan.check_page(3, 0, &page));
//!
//! let line = ResultLine::parse("vm0: WORKLOAD RESULT op=verify mib=1 ok=1").unwrap();
//! assert_eq!(line.get("ok"), Some("1"));
//! # Ok::<(), guest_workload::content::Error>(())
//! ```

pub mod churn;
pub mod content;
pub mod report;
