//! Numbers the engine hands out and takes back over its life, as guests come and go: ranges of
//! page numbers for the content index ([`PageIds`]) and trust-domain numbers ([`Domains`]).
//!
//! Neither may grow without end in a long-lived VMM that registers and unregisters guests many
//! times (reboots, migrations, tenants coming and going): both are free lists. When a number
//! may be given back is the caller's business (see `Engine::drop_guest` and
//! `State::forget_domain_if_unused`); these types only keep the books.

use hashbrown::HashMap;

/// Free ranges of page numbers in `[0, limit)`: first fit, neighbours merged when given back.
#[derive(Debug)]
pub(crate) struct PageIds {
    /// `(start, len)`, sorted by `start`, none empty, none touching the next.
    free: Vec<(u32, u32)>,
}

impl PageIds {
    /// Every number in `[0, limit)` free.
    pub fn new(limit: u32) -> Self {
        PageIds {
            free: if limit > 0 {
                vec![(0, limit)]
            } else {
                Vec::new()
            },
        }
    }

    /// The first number of `len` consecutive free numbers (the lowest range they fit in), now
    /// taken; `None` when no free range is that long. `len` must not be 0.
    pub fn take(&mut self, len: u32) -> Option<u32> {
        if len == 0 {
            return None;
        }
        let i = self.free.iter().position(|&(_, l)| l >= len)?;
        let (start, l) = self.free[i];
        if l == len {
            self.free.remove(i);
        } else {
            self.free[i] = (start + len, l - len);
        }
        Some(start)
    }

    /// Takes a range for each of `lens` (0 takes nothing and gets 0), all or none.
    pub fn take_all(&mut self, lens: &[u32]) -> Option<Vec<u32>> {
        let mut out = Vec::with_capacity(lens.len());
        for &len in lens {
            let start = if len == 0 { Some(0) } else { self.take(len) };
            match start {
                Some(s) => out.push(s),
                None => {
                    for (&s, &l) in out.iter().zip(lens) {
                        self.give_back(s, l);
                    }
                    return None;
                }
            }
        }
        Some(out)
    }

    /// Gives `[start, start + len)` back (taken earlier, and not given back since).
    pub fn give_back(&mut self, start: u32, len: u32) {
        if len == 0 {
            return;
        }
        let end = start + len;
        let i = self.free.partition_point(|&(s, _)| s < start);
        debug_assert!(
            i == 0 || self.free[i - 1].0 + self.free[i - 1].1 <= start,
            "page numbers {start}..{end} given back twice"
        );
        debug_assert!(
            i == self.free.len() || end <= self.free[i].0,
            "page numbers {start}..{end} given back twice"
        );
        let joins_prev = i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == start;
        let joins_next = i < self.free.len() && self.free[i].0 == end;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.free[i - 1].1 += len + self.free[i].1;
                self.free.remove(i);
            }
            (true, false) => self.free[i - 1].1 += len,
            (false, true) => self.free[i] = (start, len + self.free[i].1),
            (false, false) => self.free.insert(i, (start, len)),
        }
    }

    /// How many numbers are free.
    #[cfg(test)]
    pub fn free_count(&self) -> u64 {
        self.free.iter().map(|&(_, l)| u64::from(l)).sum()
    }
}

/// Most trust domains known at once: numbers `0..MAX_DOMAINS`. [`u16::MAX`] is no domain
/// (`SlotTable::reserve`'s slots).
pub(crate) const MAX_DOMAINS: usize = u16::MAX as usize;

/// Trust-domain names and their numbers; the number of a forgotten name is given to the next
/// new one.
#[derive(Debug, Default)]
pub(crate) struct Domains {
    /// By number; `None` where forgotten.
    names: Vec<Option<String>>,
    by_name: HashMap<String, u16>,
    /// Forgotten numbers.
    free: Vec<u16>,
}

impl Domains {
    /// The number of `name`, if known.
    pub fn get(&self, name: &str) -> Option<u16> {
        self.by_name.get(name).copied()
    }

    /// The number of `name`, a new one (a forgotten one first) if not known yet; `None` when
    /// [`MAX_DOMAINS`] names are known.
    pub fn id(&mut self, name: &str) -> Option<u16> {
        if let Some(id) = self.get(name) {
            return Some(id);
        }
        let id = match self.free.pop() {
            Some(id) => id,
            None if self.names.len() < MAX_DOMAINS => {
                self.names.push(None);
                u16::try_from(self.names.len() - 1).ok()?
            }
            None => return None,
        };
        self.names[usize::from(id)] = Some(name.to_string());
        self.by_name.insert(name.to_string(), id);
        Some(id)
    }

    /// The name of number `id`, if known.
    pub fn name(&self, id: u16) -> Option<&str> {
        self.names.get(usize::from(id))?.as_deref()
    }

    /// Forgets number `id` and its name (nothing may use the number any more): the number goes
    /// to the next new name.
    pub fn forget(&mut self, id: u16) {
        if let Some(name) = self.names.get_mut(usize::from(id)).and_then(Option::take) {
            self.by_name.remove(&name);
            self.free.push(id);
        }
    }

    /// The numbers of every known name.
    pub fn known(&self) -> Vec<u16> {
        self.by_name.values().copied().collect()
    }

    /// How many names are known.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_name.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_and_all_or_none() {
        let mut ids = PageIds::new(100);
        assert_eq!(ids.take(30), Some(0));
        assert_eq!(ids.take(30), Some(30));
        assert_eq!(ids.take(41), None);
        assert_eq!(ids.take(0), None);
        ids.give_back(0, 30);
        // The hole at 0 takes what fits in it, the rest goes past.
        assert_eq!(ids.take(10), Some(0));
        assert_eq!(ids.take(25), Some(60));
        assert_eq!(ids.take(20), Some(10));
        assert_eq!(ids.free_count(), 15);
        // Neither 10 nor 10 + 10 fit after 15 free numbers in two ranges: nothing is taken.
        assert_eq!(ids.take_all(&[10, 0, 10]), None);
        assert_eq!(ids.free_count(), 15);
        assert_eq!(ids.take_all(&[10, 0, 5]), Some(vec![85, 0, 95]));
        assert_eq!(ids.free_count(), 0);
        assert_eq!(ids.take(1), None);
    }

    #[test]
    fn neighbours_merge_when_given_back() {
        let mut ids = PageIds::new(90);
        let r: Vec<u32> = (0..9).map(|_| ids.take(10).unwrap()).collect();
        assert_eq!(r, (0..9).map(|i| i * 10).collect::<Vec<_>>());
        for &s in &[10, 30, 70] {
            ids.give_back(s, 10);
        }
        assert_eq!(ids.free, vec![(10, 10), (30, 10), (70, 10)]);
        ids.give_back(20, 10); // joins both neighbours
        assert_eq!(ids.free, vec![(10, 30), (70, 10)]);
        ids.give_back(80, 10); // joins the one before
        ids.give_back(0, 10); // joins the one after
        assert_eq!(ids.free, vec![(0, 40), (70, 20)]);
        for &s in &[40, 50, 60] {
            ids.give_back(s, 10);
        }
        assert_eq!(ids.free, vec![(0, 90)]);
        assert_eq!(ids.take(90), Some(0));
    }

    #[test]
    fn taking_and_giving_back_forever_never_runs_out() {
        let mut ids = PageIds::new(1 << 31);
        for _ in 0..1000 {
            let s = ids.take_all(&[1 << 29, 7, 1 << 29]).unwrap();
            ids.give_back(s[1], 7);
            ids.give_back(s[0], 1 << 29);
            ids.give_back(s[2], 1 << 29);
        }
        assert_eq!(ids.free, vec![(0, 1 << 31)]);
    }

    #[test]
    fn forgotten_domains_give_their_numbers_to_new_names() {
        let mut d = Domains::default();
        assert_eq!(d.id("red"), Some(0));
        assert_eq!(d.id("blue"), Some(1));
        assert_eq!(d.id("red"), Some(0));
        d.forget(0);
        d.forget(0);
        assert_eq!(d.get("red"), None);
        assert_eq!(d.name(0), None);
        assert_eq!(d.id("green"), Some(0));
        assert_eq!(d.name(0), Some("green"));
        assert_eq!(d.id("red"), Some(2));
        assert_eq!(d.len(), 3);
        let mut known = d.known();
        known.sort_unstable();
        assert_eq!(known, vec![0, 1, 2]);
    }

    #[test]
    fn at_most_max_domains_at_once() {
        let mut d = Domains::default();
        for i in 0..MAX_DOMAINS {
            assert_eq!(d.id(&i.to_string()), Some(i as u16));
        }
        assert_eq!(d.id("one more"), None);
        d.forget(17);
        assert_eq!(d.id("one more"), Some(17));
        assert_eq!(d.id("and another"), None);
    }
}
