//! Composing guest memory images from real files: the pure part (files in, layouts, page
//! content and expected dedup statistics out).
//!
//! Each image is `image_size` bytes. The first `reserved_low` bytes stay zero and are left out of
//! the statistics: the VMM writes its boot structures or the test guest there. The pages above
//! (the *body*) hold, per guest:
//! - `round(unique * body)` pages of unique content, in runs of 1..=32 pages;
//! - `round(zero * body)` all-zero pages, in runs of 1..=32 pages;
//! - the rest: whole files, each starting on a page boundary (its last page zero-padded), taken
//!   in one seeded order that is the same for every guest and repeated when the body is larger
//!   than the files, the last one cut short where the body ends. Guests of the same size hold
//!   the same files, as guests running the same distribution would.
//!
//! All of these extents are then shuffled with a per-guest seed, so each file sits at a
//! different page offset in each guest. The statistics are counted from the page content itself
//! (a file page that is all zeros counts as a zero page; equal pages of different files count as
//! duplicates), in Linux KSM's terms: see [`Totals`].

use std::collections::HashMap;
use std::io::{self, Seek, SeekFrom, Write};

use guest_workload::content::{PAGE_SIZE, SplitMix64, fill_random_page, key};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use xxhash_rust::xxh3::xxh3_128;

/// Version of the layout algorithm: part of what identifies a composition's images.
pub const LAYOUT_VERSION: u32 = 2;
/// Low memory kept free of content by default: 2 MiB.
pub const DEFAULT_RESERVED_LOW: u64 = 2 << 20;
/// Longest run of unique or zero pages.
const MAX_RUN: u64 = 32;
/// First bytes of every unique page (followed by the guest and the page's ordinal).
const UNIQUE_MAGIC: &[u8; 8] = b"GIUNIQ\0\0";
const TAG_LAYOUT: u64 = 0x6c61_796f_7574;
const TAG_ORDER: u64 = 0x006f_7264_6572;
const TAG_UNIQUE: u64 = 0x756e_6971_7565;

const PAGE: u64 = PAGE_SIZE as u64;

/// Errors from composing images.
#[derive(Debug, Error, PartialEq)]
pub enum Error {
    /// No guests asked for.
    #[error("at least one guest is needed")]
    NoGuests,
    /// A size that is not a whole number of pages.
    #[error("{what} ({value} bytes) is not a multiple of {PAGE_SIZE}")]
    NotPageMultiple {
        /// Which size.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// The image has no room above the reserved low memory.
    #[error("image size {size} leaves no room above the reserved {reserved} bytes")]
    TooSmall {
        /// Image size.
        size: u64,
        /// Reserved low memory.
        reserved: u64,
    },
    /// A fraction outside `[0, 1]`, or unique + zero above 1.
    #[error(
        "unique ({unique}) and zero ({zero}) fractions must be in [0, 1] and add up to at most 1"
    )]
    Fractions {
        /// The unique fraction.
        unique: f64,
        /// The zero fraction.
        zero: f64,
    },
    /// File pages are needed but no file has content.
    #[error("no non-empty source file to place")]
    NoFiles,
}

/// A source file and its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Where it comes from, e.g. `libc6:/usr/lib/x86_64-linux-gnu/libc.so.6`.
    pub name: String,
    /// Its bytes.
    pub data: Vec<u8>,
}

impl SourceFile {
    /// Pages the file takes when placed page-aligned.
    pub fn pages(&self) -> u64 {
        (self.data.len() as u64).div_ceil(PAGE)
    }
}

/// What to compose.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Number of guest images.
    pub guests: usize,
    /// Size of each image in bytes (whole pages).
    pub image_size: u64,
    /// Fraction of body pages with unique content.
    pub unique: f64,
    /// Fraction of body pages that are all zero.
    pub zero: f64,
    /// Seed of the layouts and of the unique content.
    pub seed: u64,
    /// Low bytes of each image left zero and out of the statistics (whole pages).
    pub reserved_low: u64,
}

/// A run of pages in an image body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Pages `first_page..first_page + pages` of source file `file`.
    File {
        /// Index into the source files.
        file: usize,
        /// First page of the file placed.
        first_page: u64,
        /// Pages placed.
        pages: u64,
    },
    /// Unique pages with ordinals `first..first + pages` in this guest.
    Unique {
        /// Ordinal of the first page.
        first: u64,
        /// Pages.
        pages: u64,
    },
    /// All-zero pages.
    Zero {
        /// Pages.
        pages: u64,
    },
}

impl Extent {
    /// Pages in the extent.
    pub fn pages(&self) -> u64 {
        match *self {
            Extent::File { pages, .. } | Extent::Unique { pages, .. } | Extent::Zero { pages } => {
                pages
            }
        }
    }
}

/// Expected figures for one guest's body pages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    /// Body pages (image pages above the reserved low memory).
    pub pages: u64,
    /// Pages placed from files (including file pages that are all zeros).
    pub file_pages: u64,
    /// Pages of generated unique content.
    pub unique_pages: u64,
    /// Zero pages placed by the zero fraction.
    pub zero_fill_pages: u64,
    /// All-zero body pages: the zero fill plus all-zero file pages.
    pub zero_pages: u64,
    /// Distinct non-zero contents in this guest.
    pub distinct_nonzero: u64,
    /// Non-zero pages whose content appears earlier in this guest.
    pub dup_within_guest: u64,
    /// Non-zero pages whose content is new to this guest but appears in an earlier guest.
    pub dup_across_guests: u64,
    /// File extents placed.
    pub file_extents: u64,
}

/// Expected figures over all guests, with Linux KSM's names for a full merge of non-zero pages
/// (zero pages are counted apart, as KSM's `use_zero_pages` does).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Body pages of all guests.
    pub pages: u64,
    /// All-zero body pages.
    pub zero_pages: u64,
    /// Distinct non-zero contents found at least twice (pages kept after merging).
    pub pages_shared: u64,
    /// Further copies of those contents (pages freed by merging).
    pub pages_sharing: u64,
    /// Non-zero contents found once.
    pub pages_unshared: u64,
    /// Sum of the guests' `dup_within_guest`.
    pub dup_within_guests: u64,
    /// Sum of the guests' `dup_across_guests` (`+ dup_within_guests = pages_sharing`).
    pub dup_across_guests: u64,
    /// Pages a full merge frees: `pages_sharing + zero_pages`.
    pub pages_saved: u64,
    /// `pages_saved` in bytes.
    pub bytes_saved: u64,
}

/// Expected statistics of a composition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Per guest, in guest order.
    pub guests: Vec<GuestStats>,
    /// Over all guests.
    pub totals: Totals,
}

/// Composed layouts and their expected statistics.
#[derive(Debug)]
pub struct Composition<'a> {
    files: &'a [SourceFile],
    params: Params,
    layouts: Vec<Vec<Extent>>,
    stats: Stats,
}

/// Writes unique page `ordinal` of `guest` into `out`.
pub fn unique_page(seed: u64, guest: usize, ordinal: u64, out: &mut [u8; PAGE_SIZE]) {
    fill_random_page(key(&[TAG_UNIQUE, seed, guest as u64, ordinal]), out);
    out[..8].copy_from_slice(UNIQUE_MAGIC);
    out[8..16].copy_from_slice(&(guest as u64).to_le_bytes());
    out[16..24].copy_from_slice(&ordinal.to_le_bytes());
}

/// Copies page `page` of `data` into `out`, zero-padding past the end.
fn file_page(data: &[u8], page: u64, out: &mut [u8; PAGE_SIZE]) {
    let start = (page * PAGE) as usize;
    let end = (start + PAGE_SIZE).min(data.len());
    let n = end.saturating_sub(start);
    out[..n].copy_from_slice(&data[start..start + n]);
    out[n..].fill(0);
}

impl Params {
    /// Checks the parameters; returns the number of body pages per image.
    pub fn body_pages(&self) -> Result<u64, Error> {
        let p = self;
        if p.guests == 0 {
            return Err(Error::NoGuests);
        }
        for (what, value) in [
            ("image size", p.image_size),
            ("reserved low memory", p.reserved_low),
        ] {
            if value % PAGE != 0 {
                return Err(Error::NotPageMultiple { what, value });
            }
        }
        if p.image_size <= p.reserved_low {
            return Err(Error::TooSmall {
                size: p.image_size,
                reserved: p.reserved_low,
            });
        }
        let ok = |f: f64| (0.0..=1.0).contains(&f);
        if !ok(p.unique) || !ok(p.zero) || p.unique + p.zero > 1.0 + 1e-9 {
            return Err(Error::Fractions {
                unique: p.unique,
                zero: p.zero,
            });
        }
        Ok((p.image_size - p.reserved_low) / PAGE)
    }
}

/// Splits `total` pages into runs of 1..=[`MAX_RUN`] pages.
fn runs(total: u64, rng: &mut SplitMix64, make: impl Fn(u64) -> Extent, into: &mut Vec<Extent>) {
    let mut left = total;
    while left > 0 {
        let n = (1 + rng.below(MAX_RUN)).min(left);
        into.push(make(n));
        left -= n;
    }
}

/// Lays out one guest's body.
fn layout(files: &[SourceFile], p: &Params, body: u64, guest: usize) -> Result<Vec<Extent>, Error> {
    let unique = ((p.unique * body as f64).round() as u64).min(body);
    let zero = ((p.zero * body as f64).round() as u64).min(body - unique);
    let mut left = body - unique - zero;
    // which files, in which order: the same for every guest
    let mut order: Vec<usize> = (0..files.len()).filter(|&i| files[i].pages() > 0).collect();
    if left > 0 && order.is_empty() {
        return Err(Error::NoFiles);
    }
    SplitMix64::new(key(&[TAG_ORDER, p.seed])).shuffle(&mut order);
    // where they go: different in each guest
    let mut rng = SplitMix64::new(key(&[TAG_LAYOUT, p.seed, guest as u64]));
    let mut extents = Vec::new();
    while left > 0 {
        for &file in &order {
            let pages = files[file].pages().min(left);
            extents.push(Extent::File {
                file,
                first_page: 0,
                pages,
            });
            left -= pages;
            if left == 0 {
                break;
            }
        }
    }
    runs(
        unique,
        &mut rng,
        |pages| Extent::Unique { first: 0, pages },
        &mut extents,
    );
    runs(zero, &mut rng, |pages| Extent::Zero { pages }, &mut extents);
    rng.shuffle(&mut extents);
    let mut ordinal = 0;
    for e in &mut extents {
        if let Extent::Unique { first, pages } = e {
            *first = ordinal;
            ordinal += *pages;
        }
    }
    Ok(extents)
}

/// Content identities of pages, found by a 128-bit hash and confirmed byte for byte.
struct ContentIndex<'a> {
    files: &'a [SourceFile],
    by_hash: HashMap<u128, (u32, usize, u64)>,
    /// Per file and page: the content id, or `None` for an all-zero page.
    file_ids: Vec<Vec<Option<u32>>>,
    next_id: u32,
}

impl<'a> ContentIndex<'a> {
    fn new(files: &'a [SourceFile]) -> Self {
        let mut index = Self {
            files,
            by_hash: HashMap::new(),
            file_ids: Vec::with_capacity(files.len()),
            next_id: 0,
        };
        let mut buf = [0u8; PAGE_SIZE];
        for (f, file) in files.iter().enumerate() {
            let mut ids = Vec::with_capacity(file.pages() as usize);
            for page in 0..file.pages() {
                file_page(&file.data, page, &mut buf);
                let id = if buf.iter().all(|&b| b == 0) {
                    None
                } else {
                    Some(
                        index
                            .lookup(&buf)
                            .unwrap_or_else(|| index.insert(&buf, f, page)),
                    )
                };
                ids.push(id);
            }
            index.file_ids.push(ids);
        }
        index
    }

    fn lookup(&self, content: &[u8; PAGE_SIZE]) -> Option<u32> {
        let &(id, file, page) = self.by_hash.get(&xxh3_128(content))?;
        let mut buf = [0u8; PAGE_SIZE];
        file_page(&self.files[file].data, page, &mut buf);
        (buf == *content).then_some(id)
    }

    fn insert(&mut self, content: &[u8; PAGE_SIZE], file: usize, page: u64) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        // a 128-bit collision between different pages is not a practical concern; were one to
        // happen, the later page would only be counted as a distinct content
        self.by_hash
            .entry(xxh3_128(content))
            .or_insert((id, file, page));
        id
    }
}

/// Counts occurrences of content ids across guests.
struct Counter {
    count: Vec<u64>,
    stamp: Vec<usize>,
    seen_before: Vec<bool>,
    touched: Vec<u32>,
}

impl Counter {
    fn new(ids: u32) -> Self {
        Self {
            count: vec![0; ids as usize],
            stamp: vec![usize::MAX; ids as usize],
            seen_before: vec![false; ids as usize],
            touched: Vec::new(),
        }
    }

    fn add(&mut self, id: u32, guest: usize, s: &mut GuestStats) {
        let i = id as usize;
        self.count[i] += 1;
        if self.stamp[i] == guest {
            s.dup_within_guest += 1;
        } else {
            self.stamp[i] = guest;
            self.touched.push(id);
            s.distinct_nonzero += 1;
            if self.seen_before[i] {
                s.dup_across_guests += 1;
            }
        }
    }

    fn end_guest(&mut self) {
        for id in self.touched.drain(..) {
            self.seen_before[id as usize] = true;
        }
    }
}

/// Lays out `params.guests` images from `files` and counts their expected statistics.
pub fn compose(files: &[SourceFile], params: Params) -> Result<Composition<'_>, Error> {
    let body = params.body_pages()?;
    let layouts = (0..params.guests)
        .map(|g| layout(files, &params, body, g))
        .collect::<Result<Vec<_>, _>>()?;
    let index = ContentIndex::new(files);
    let mut counter = Counter::new(index.next_id);
    let mut fresh_unique = 0;
    let mut guests = Vec::with_capacity(params.guests);
    let mut buf = [0u8; PAGE_SIZE];
    for (g, extents) in layouts.iter().enumerate() {
        let mut s = GuestStats {
            pages: body,
            ..GuestStats::default()
        };
        for extent in extents {
            match *extent {
                Extent::File {
                    file,
                    first_page,
                    pages,
                } => {
                    s.file_pages += pages;
                    s.file_extents += 1;
                    for page in first_page..first_page + pages {
                        match index.file_ids[file][page as usize] {
                            Some(id) => counter.add(id, g, &mut s),
                            None => s.zero_pages += 1,
                        }
                    }
                }
                Extent::Unique { first, pages } => {
                    s.unique_pages += pages;
                    for ordinal in first..first + pages {
                        unique_page(params.seed, g, ordinal, &mut buf);
                        match index.lookup(&buf) {
                            Some(id) => counter.add(id, g, &mut s),
                            None => {
                                fresh_unique += 1;
                                s.distinct_nonzero += 1;
                            }
                        }
                    }
                }
                Extent::Zero { pages } => {
                    s.zero_fill_pages += pages;
                    s.zero_pages += pages;
                }
            }
        }
        counter.end_guest();
        guests.push(s);
    }
    let mut t = Totals {
        pages: body * params.guests as u64,
        pages_unshared: fresh_unique,
        ..Totals::default()
    };
    for &c in &counter.count {
        match c {
            0 => {}
            1 => t.pages_unshared += 1,
            n => {
                t.pages_shared += 1;
                t.pages_sharing += n - 1;
            }
        }
    }
    for s in &guests {
        t.zero_pages += s.zero_pages;
        t.dup_within_guests += s.dup_within_guest;
        t.dup_across_guests += s.dup_across_guests;
    }
    t.pages_saved = t.pages_sharing + t.zero_pages;
    t.bytes_saved = t.pages_saved * PAGE;
    Ok(Composition {
        files,
        params,
        layouts,
        stats: Stats { guests, totals: t },
    })
}

impl Composition<'_> {
    /// The parameters composed with.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The expected statistics.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The body extents of `guest`, in address order from `reserved_low` (empty past the last).
    pub fn extents(&self, guest: usize) -> &[Extent] {
        self.layouts.get(guest).map_or(&[], Vec::as_slice)
    }

    /// Writes the content of image page `page` of `guest` into `out` (zeros outside the body).
    pub fn page(&self, guest: usize, page: u64, out: &mut [u8; PAGE_SIZE]) {
        out.fill(0);
        let Some(mut offset) = page.checked_sub(self.params.reserved_low / PAGE) else {
            return;
        };
        for extent in self.extents(guest) {
            if offset >= extent.pages() {
                offset -= extent.pages();
                continue;
            }
            match *extent {
                Extent::File {
                    file, first_page, ..
                } => file_page(&self.files[file].data, first_page + offset, out),
                Extent::Unique { first, .. } => {
                    unique_page(self.params.seed, guest, first + offset, out)
                }
                Extent::Zero { .. } => {}
            }
            return;
        }
    }

    /// Writes the image of `guest` to `out`, which must be empty (a new file or buffer): zero
    /// runs are skipped with seeks (holes in a file), and the end is set with a last zero byte.
    /// `progress` is told the pages done after each extent.
    pub fn write_image<W: Write + Seek>(
        &self,
        guest: usize,
        out: &mut W,
        progress: &mut dyn FnMut(u64),
    ) -> io::Result<()> {
        let mut pos = self.params.reserved_low / PAGE;
        let mut end_written = 0;
        let mut buf = [0u8; PAGE_SIZE];
        for extent in self.extents(guest) {
            match *extent {
                Extent::File {
                    file,
                    first_page,
                    pages,
                } => {
                    out.seek(SeekFrom::Start(pos * PAGE))?;
                    let data = &self.files[file].data;
                    let start = (first_page * PAGE) as usize;
                    let end = ((first_page + pages) * PAGE) as usize;
                    let have = &data[start..end.min(data.len())];
                    out.write_all(have)?;
                    let pad = (pages * PAGE) as usize - have.len();
                    out.write_all(&buf[..pad.min(PAGE_SIZE)])?;
                    end_written = (pos + pages) * PAGE;
                }
                Extent::Unique { first, pages } => {
                    out.seek(SeekFrom::Start(pos * PAGE))?;
                    for ordinal in first..first + pages {
                        unique_page(self.params.seed, guest, ordinal, &mut buf);
                        out.write_all(&buf)?;
                    }
                    buf.fill(0);
                    end_written = (pos + pages) * PAGE;
                }
                Extent::Zero { .. } => {}
            }
            pos += extent.pages();
            progress(pos);
        }
        if end_written < self.params.image_size {
            out.seek(SeekFrom::Start(self.params.image_size - 1))?;
            out.write_all(&[0])?;
        }
        out.flush()
    }
}

#[cfg(test)]
#[path = "compose_tests.rs"]
mod tests;
