//! The mapping of a layered template: which build's data (or zeroes) backs every byte.
//!
//! A mapping is a list of runs that tile the device `[0, size)` exactly, in ascending order, each
//! either [`RunKind::Zero`] or [`RunKind::Data`] (a build, by its index in the layer's lineage,
//! and an offset in that build's data file). It is kept *normalised*: no run is empty and no two
//! neighbours could be one run (both zero, or both data of the same build with contiguous data
//! offsets). A read therefore resolves with one binary search plus a walk over the runs its range
//! covers.
//!
//! Merge rule for a new layer ([`Mapping::overlay`]): the child's mapping is the parent's with
//! every diff run laid on top — bytes the diff names come from the diff (data packed into the new
//! build, or zero), every other byte keeps the parent's source with the parent's build indices
//! shifted by one (index 0 is always the layer's own build). The result is normalised again.

/// Where the bytes of one run come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// The run reads as zeroes; no data is stored.
    Zero,
    /// The run is stored in build `build` (index into the layer's lineage) at `data_offset`.
    Data {
        /// Index of the build in the lineage (0 = this layer's own build).
        build: u32,
        /// Offset of the run's first byte in that build's data file.
        data_offset: u64,
    },
}

/// One run of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRun {
    /// First device byte of the run.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub len: u64,
    /// Its source.
    pub kind: RunKind,
}

impl MapRun {
    /// One past the last device byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    /// The part of this run covering `[from, to)`, which must lie inside it.
    fn slice(&self, from: u64, to: u64) -> MapRun {
        debug_assert!(self.offset <= from && from < to && to <= self.end());
        let kind = match self.kind {
            RunKind::Zero => RunKind::Zero,
            RunKind::Data { build, data_offset } => RunKind::Data {
                build,
                data_offset: data_offset + (from - self.offset),
            },
        };
        MapRun {
            offset: from,
            len: to - from,
            kind,
        }
    }
}

/// A new layer's own runs: the diff laid over the parent, in ascending order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiffSource {
    /// The range reads as zeroes in the new layer.
    Zero,
    /// The range is stored in the new layer's data at this offset.
    Data(u64),
}

/// A normalised mapping covering a whole device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    size: u64,
    runs: Vec<MapRun>,
}

impl Mapping {
    /// Builds a mapping from runs, checking that they tile `[0, size)` and normalising them.
    /// Returns a description of the first problem on failure.
    pub fn new(size: u64, runs: Vec<MapRun>) -> Result<Self, String> {
        let mut pos = 0u64;
        for (i, r) in runs.iter().enumerate() {
            if r.len == 0 {
                return Err(format!("run {i} is empty"));
            }
            if r.offset != pos {
                return Err(format!("run {i} starts at {} instead of {pos}", r.offset));
            }
            pos = r
                .offset
                .checked_add(r.len)
                .ok_or_else(|| format!("run {i} overflows"))?;
            if let RunKind::Data { data_offset, .. } = r.kind {
                data_offset
                    .checked_add(r.len)
                    .ok_or_else(|| format!("run {i} data range overflows"))?;
            }
        }
        if pos != size {
            return Err(format!("runs cover {pos} bytes of a {size}-byte device"));
        }
        let mut m = Mapping { size, runs };
        m.normalise();
        Ok(m)
    }

    /// A device of `size` bytes that reads as zeroes.
    pub fn zeroes(size: u64) -> Self {
        let runs = if size == 0 {
            Vec::new()
        } else {
            vec![MapRun {
                offset: 0,
                len: size,
                kind: RunKind::Zero,
            }]
        };
        Mapping { size, runs }
    }

    /// Size of the device in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// This mapping over a device of `size` bytes (at least its own): the bytes past its end
    /// are zeros.
    pub fn grown(&self, size: u64) -> Mapping {
        let mut m = self.clone();
        if size > m.size {
            m.runs.push(MapRun {
                offset: m.size,
                len: size - m.size,
                kind: RunKind::Zero,
            });
            m.size = size;
            m.normalise();
        }
        m
    }

    /// The runs, ascending.
    pub fn runs(&self) -> &[MapRun] {
        &self.runs
    }

    /// Index of the run holding byte `offset` (which must be below the size).
    pub fn find(&self, offset: u64) -> usize {
        self.runs.partition_point(|r| r.end() <= offset)
    }

    /// The runs covering `[offset, offset + len)`, clipped to it.
    pub fn lookup(&self, offset: u64, len: u64) -> impl Iterator<Item = MapRun> + '_ {
        let end = offset.saturating_add(len).min(self.size);
        let start = if offset < end {
            self.find(offset)
        } else {
            self.runs.len()
        };
        self.runs[start..]
            .iter()
            .take_while(move |r| r.offset < end)
            .map(move |r| r.slice(r.offset.max(offset), r.end().min(end)))
    }

    /// Coalesces neighbours that can be one run.
    fn normalise(&mut self) {
        let mut out: Vec<MapRun> = Vec::with_capacity(self.runs.len());
        for r in self.runs.drain(..) {
            if r.len == 0 {
                continue;
            }
            if let Some(last) = out.last_mut() {
                let joins = match (last.kind, r.kind) {
                    (RunKind::Zero, RunKind::Zero) => true,
                    (
                        RunKind::Data {
                            build: b1,
                            data_offset: d1,
                        },
                        RunKind::Data {
                            build: b2,
                            data_offset: d2,
                        },
                    ) => b1 == b2 && d1 + last.len == d2,
                    _ => false,
                };
                if joins && last.end() == r.offset {
                    last.len += r.len;
                    continue;
                }
            }
            out.push(r);
        }
        self.runs = out;
    }

    /// The mapping of a child layer: `diff` (ascending, non-overlapping `(offset, len, source)`
    /// within the device) laid over this mapping, whose build indices shift up by one. The
    /// caller has validated the diff.
    pub fn overlay(&self, diff: &[(u64, u64, DiffSource)]) -> Mapping {
        let mut out = Vec::with_capacity(self.runs.len() + 2 * diff.len());
        let mut pos = 0u64;
        let copy_parent = |out: &mut Vec<MapRun>, from: u64, to: u64| {
            for r in self.lookup(from, to - from) {
                let kind = match r.kind {
                    RunKind::Zero => RunKind::Zero,
                    RunKind::Data { build, data_offset } => RunKind::Data {
                        build: build + 1,
                        data_offset,
                    },
                };
                out.push(MapRun { kind, ..r });
            }
        };
        for &(offset, len, src) in diff {
            if offset > pos {
                copy_parent(&mut out, pos, offset);
            }
            let kind = match src {
                DiffSource::Zero => RunKind::Zero,
                DiffSource::Data(data_offset) => RunKind::Data {
                    build: 0,
                    data_offset,
                },
            };
            out.push(MapRun { offset, len, kind });
            pos = offset + len;
        }
        if pos < self.size {
            copy_parent(&mut out, pos, self.size);
        }
        let mut m = Mapping {
            size: self.size,
            runs: out,
        };
        m.normalise();
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(offset: u64, len: u64, build: u32, d: u64) -> MapRun {
        MapRun {
            offset,
            len,
            kind: RunKind::Data {
                build,
                data_offset: d,
            },
        }
    }

    fn zero(offset: u64, len: u64) -> MapRun {
        MapRun {
            offset,
            len,
            kind: RunKind::Zero,
        }
    }

    #[test]
    fn new_rejects_gaps_overlaps_and_short_cover() {
        assert!(Mapping::new(10, vec![zero(0, 4), zero(5, 5)]).is_err());
        assert!(Mapping::new(10, vec![zero(0, 6), zero(5, 5)]).is_err());
        assert!(Mapping::new(10, vec![zero(0, 4)]).is_err());
        assert!(Mapping::new(10, vec![zero(0, 4), zero(4, 0), zero(4, 6)]).is_err());
    }

    #[test]
    fn new_normalises() {
        let m = Mapping::new(
            16,
            vec![
                zero(0, 2),
                zero(2, 2),
                data(4, 4, 0, 0),
                data(8, 4, 0, 4),
                data(12, 4, 1, 8),
            ],
        )
        .unwrap();
        assert_eq!(m.runs(), &[zero(0, 4), data(4, 8, 0, 0), data(12, 4, 1, 8)]);
    }

    #[test]
    fn lookup_clips() {
        let m = Mapping::new(16, vec![zero(0, 4), data(4, 8, 0, 100), zero(12, 4)]).unwrap();
        let got: Vec<_> = m.lookup(6, 8).collect();
        assert_eq!(got, vec![data(6, 6, 0, 102), zero(12, 2)]);
        assert_eq!(m.lookup(16, 4).count(), 0);
    }

    #[test]
    fn overlay_splits_and_shifts() {
        let parent = Mapping::new(16, vec![data(0, 16, 0, 0)]).unwrap();
        let child = parent.overlay(&[(4, 4, DiffSource::Data(0)), (8, 2, DiffSource::Zero)]);
        assert_eq!(
            child.runs(),
            &[
                data(0, 4, 1, 0),
                data(4, 4, 0, 0),
                zero(8, 2),
                data(10, 6, 1, 10)
            ]
        );
        // Rewriting the zero back with the parent's neighbours coalesces again.
        let grandchild = child.overlay(&[]);
        assert_eq!(grandchild.runs().len(), 4);
    }
}
