//! The error model: one [`Error`] type, one table mapping each condition to upstream's errno.
//!
//! Every variant names a *condition* (what went wrong), not a number, so callers can match on
//! meaning; [`Error::errno`] is the single place where conditions become the errno values that
//! Linux 7.3's LUO returns for them (spec §2.6). Handler and platform failures carry the errno
//! they produced through [`Error::Handler`] and [`Error::Platform`] unchanged.

use core::fmt;

/// A positive Linux errno value (the kernel returns it negated).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Errno(i32);

impl Errno {
    /// Wraps a positive errno. Values `<= 0` are mapped to `EINVAL` so that an `Errno` is never
    /// mistaken for success: handler contracts are enforced here (upstream bug B8).
    pub const fn new(value: i32) -> Self {
        if value > 0 {
            Errno(value)
        } else {
            EINVAL
        }
    }

    /// Builds an errno from a kernel-style return value (`-EFOO`); `None` for `>= 0`.
    pub const fn from_kernel_ret(ret: i32) -> Option<Self> {
        if ret < 0 {
            // A return of i32::MIN cannot be negated; it is not a valid errno anyway.
            if ret == i32::MIN {
                Some(EINVAL)
            } else {
                Some(Errno(-ret))
            }
        } else {
            None
        }
    }

    /// The positive errno value.
    pub const fn get(self) -> i32 {
        self.0
    }

    /// The symbolic name of the errno, for logs and tests (`"EINVAL"`).
    pub const fn name(self) -> &'static str {
        match self.0 {
            1 => "EPERM",
            2 => "ENOENT",
            5 => "EIO",
            7 => "E2BIG",
            9 => "EBADF",
            12 => "ENOMEM",
            14 => "EFAULT",
            16 => "EBUSY",
            17 => "EEXIST",
            19 => "ENODEV",
            22 => "EINVAL",
            23 => "ENFILE",
            24 => "EMFILE",
            25 => "ENOTTY",
            27 => "EFBIG",
            28 => "ENOSPC",
            61 => "ENODATA",
            95 => "EOPNOTSUPP",
            108 => "ESHUTDOWN",
            _ => "E?",
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Operation not permitted.
pub const EPERM: Errno = Errno(1);
/// No such file or directory (unknown session, token, handler).
pub const ENOENT: Errno = Errno(2);
/// I/O error (incoming state refused at open).
pub const EIO: Errno = Errno(5);
/// Argument list too long (non-zero bytes past a known struct).
pub const E2BIG: Errno = Errno(7);
/// Bad file descriptor.
pub const EBADF: Errno = Errno(9);
/// Out of memory.
pub const ENOMEM: Errno = Errno(12);
/// Bad address.
pub const EFAULT: Errno = Errno(14);
/// Device or resource busy.
pub const EBUSY: Errno = Errno(16);
/// File exists.
pub const EEXIST: Errno = Errno(17);
/// No such device.
pub const ENODEV: Errno = Errno(19);
/// Invalid argument.
pub const EINVAL: Errno = Errno(22);
/// File table overflow.
pub const ENFILE: Errno = Errno(23);
/// Too many open files.
pub const EMFILE: Errno = Errno(24);
/// Inappropriate ioctl for device.
pub const ENOTTY: Errno = Errno(25);
/// File too large.
pub const EFBIG: Errno = Errno(27);
/// No space left on device.
pub const ENOSPC: Errno = Errno(28);
/// No data available.
pub const ENODATA: Errno = Errno(61);
/// Operation not supported.
pub const EOPNOTSUPP: Errno = Errno(95);
/// Cannot send after transport endpoint shutdown: the state was serialized for the next kernel.
pub const ESHUTDOWN: Errno = Errno(108);

/// Why a handover image (the `luo-v5` state left by the previous kernel) was refused.
///
/// Each variant names the rule that was broken; `at` is the physical address (or, for the
/// userspace backend, the offset into the handover memfd) where the offending bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoverError {
    /// The `"LUO"` blob is shorter than `struct luo_ser`.
    RootTooSmall {
        /// The blob size that was recorded.
        size: u64,
    },
    /// `luo_ser.compatible` is not `"luo-v5"`.
    BadCompatible {
        /// Where the root lives.
        at: u64,
    },
    /// An address does not name handover memory the platform can read.
    BadAddress {
        /// The address.
        at: u64,
    },
    /// A block chain loops back on itself.
    Cycle {
        /// The block address seen twice.
        at: u64,
    },
    /// A block chain is longer than `KHO_MAX_BLOCKS`.
    TooManyBlocks {
        /// The block that went past the limit.
        at: u64,
    },
    /// A block's entry count is zero or larger than a block can hold.
    BadBlockCount {
        /// The block.
        at: u64,
        /// The count it claims.
        count: u64,
    },
    /// A session name is empty or has no NUL in its 64 bytes.
    BadSessionName {
        /// The entry.
        at: u64,
    },
    /// Two incoming sessions have the same name.
    DuplicateSessionName {
        /// The second entry.
        at: u64,
    },
    /// A compatible string (file handler or FLB) is empty or has no NUL in its 48 bytes.
    BadCompatibleString {
        /// The entry.
        at: u64,
    },
    /// Two files of one session have the same token.
    DuplicateToken {
        /// The second entry.
        at: u64,
        /// The token.
        token: u64,
    },
    /// A session's file count disagrees with its file chain.
    FileCountMismatch {
        /// The session entry.
        at: u64,
        /// What the session entry claims.
        claimed: u64,
        /// What the chain holds.
        found: u64,
    },
    /// The FLB page header is inconsistent (`pgcnt != 1` or too many entries).
    BadFlbHeader {
        /// The FLB page.
        at: u64,
    },
    /// Two FLB entries have the same name.
    DuplicateFlb {
        /// The second entry.
        at: u64,
    },
    /// No registered file handler has this compatible string (may succeed once it registers).
    UnknownHandler {
        /// The session entry.
        at: u64,
    },
    /// The platform could not allocate memory while reading the image.
    NoMemory,
}

impl HandoverError {
    /// The errno upstream gives for the same condition (mostly `EINVAL`, spec §7.3, §4.6).
    pub const fn errno(self) -> Errno {
        match self {
            HandoverError::TooManyBlocks { .. } => ENOSPC,
            HandoverError::UnknownHandler { .. } => ENOENT,
            HandoverError::NoMemory => ENOMEM,
            HandoverError::DuplicateSessionName { .. } => EEXIST,
            _ => EINVAL,
        }
    }

    /// The address the error refers to, if any.
    pub const fn at(self) -> Option<u64> {
        match self {
            HandoverError::RootTooSmall { .. } | HandoverError::NoMemory => None,
            HandoverError::BadCompatible { at }
            | HandoverError::BadAddress { at }
            | HandoverError::Cycle { at }
            | HandoverError::TooManyBlocks { at }
            | HandoverError::BadBlockCount { at, .. }
            | HandoverError::BadSessionName { at }
            | HandoverError::DuplicateSessionName { at }
            | HandoverError::BadCompatibleString { at }
            | HandoverError::DuplicateToken { at, .. }
            | HandoverError::FileCountMismatch { at, .. }
            | HandoverError::BadFlbHeader { at }
            | HandoverError::DuplicateFlb { at }
            | HandoverError::UnknownHandler { at } => Some(at),
        }
    }
}

impl fmt::Display for HandoverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            HandoverError::RootTooSmall { size } => {
                write!(
                    f,
                    "LUO root blob is {size} bytes, smaller than luo_ser (32)"
                )
            }
            HandoverError::BadCompatible { at } => {
                write!(f, "at {at:#x}: luo_ser.compatible is not \"luo-v5\"")
            }
            HandoverError::BadAddress { at } => {
                write!(f, "at {at:#x}: address is not readable handover memory")
            }
            HandoverError::Cycle { at } => write!(f, "at {at:#x}: block chain has a cycle"),
            HandoverError::TooManyBlocks { at } => {
                write!(f, "at {at:#x}: block chain longer than 10000 blocks")
            }
            HandoverError::BadBlockCount { at, count } => {
                write!(f, "at {at:#x}: block contains invalid entry count {count}")
            }
            HandoverError::BadSessionName { at } => {
                write!(f, "at {at:#x}: session name is empty or not NUL-terminated")
            }
            HandoverError::DuplicateSessionName { at } => {
                write!(f, "at {at:#x}: duplicate session name")
            }
            HandoverError::BadCompatibleString { at } => {
                write!(
                    f,
                    "at {at:#x}: compatible string is empty or not NUL-terminated"
                )
            }
            HandoverError::DuplicateToken { at, token } => {
                write!(f, "at {at:#x}: duplicate file token {token:#x}")
            }
            HandoverError::FileCountMismatch { at, claimed, found } => write!(
                f,
                "at {at:#x}: session claims {claimed} files but its chain holds {found}"
            ),
            HandoverError::BadFlbHeader { at } => {
                write!(
                    f,
                    "at {at:#x}: FLB header has pgcnt != 1 or too many entries"
                )
            }
            HandoverError::DuplicateFlb { at } => write!(f, "at {at:#x}: duplicate FLB name"),
            HandoverError::UnknownHandler { at } => {
                write!(f, "at {at:#x}: no registered handler for this compatible")
            }
            HandoverError::NoMemory => write!(f, "out of memory while reading handover state"),
        }
    }
}

/// Every way a LUO operation can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// The ioctl number is outside the range of the fd it was sent to.
    BadCommand,
    /// The ioctl number is in range but the full command word differs (the VFS's `ENOTTY`).
    UnknownCommand,
    /// A session ioctl sent to a session of the wrong direction (e.g. PRESERVE_FD on incoming).
    WrongDirection,
    /// The `size` field is smaller than the struct.
    StructTooSmall,
    /// Non-zero bytes past the struct the kernel knows.
    TrailingNonZero,
    /// Reading or writing the user's argument faulted.
    Fault,
    /// A `reserved` field is not zero.
    ReservedNotZero,
    /// `/dev/liveupdate` is already open.
    DeviceBusy,
    /// The incoming handover state was refused (open after a failed deserialization).
    IncomingRefused,
    /// Session name is empty.
    NameEmpty,
    /// Session name has no NUL within its 64 bytes.
    NameUnterminated,
    /// An outgoing session with this name exists.
    NameExists,
    /// No incoming session with this name.
    NoSuchSession,
    /// The incoming session was already retrieved.
    AlreadyRetrieved,
    /// The token is already used by a file in this session.
    TokenInUse,
    /// The fd is not an open file LUO can use.
    BadFd,
    /// No registered handler accepts the file.
    NoHandler,
    /// The file is already preserved (in any session) or retrieved and not finished.
    AlreadyPreserved,
    /// No file with this token in the session.
    NoSuchToken,
    /// A `can_finish` callback refused.
    FinishRefused,
    /// A block set would exceed `KHO_MAX_BLOCKS`, or the FLB table is full.
    NoSpace,
    /// Out of memory.
    NoMemory,
    /// The fd table is full.
    TooManyFds,
    /// The system file table is full (anon file creation).
    FileTableFull,
    /// LUO is disabled (`liveupdate=` off or KHO off).
    Disabled,
    /// Already registered (handler or FLB link or compatible string).
    AlreadyRegistered,
    /// A handler or FLB definition is invalid (missing op, bad compatible).
    InvalidDefinition,
    /// The FLB is not linked to any handler, or has no outgoing object.
    FlbNotFound,
    /// No incoming FLB data (none handed over, or already finished).
    FlbNoData,
    /// The FLB or handler owner module is gone.
    OwnerGone,
    /// The state was serialized for the next kernel; nothing may change any more.
    ///
    /// Upstream blocks the caller forever instead (it holds the serialize rwsem); the kernel
    /// backend does the same, the userspace backend returns `ESHUTDOWN`.
    Serialized,
    /// A callback (file handler or FLB) failed with this errno.
    Handler(Errno),
    /// The platform failed with this errno.
    Platform(Errno),
}

// Eight bytes, so that a `Result<_, Error>` travels in registers: the ioctl paths return
// one at every step. What a malformed handover is about ([`HandoverError`], with addresses) is
// reported where it is found (boot, the first open), not carried through every operation.
const _: () = assert!(core::mem::size_of::<Error>() == 8);
const _: () = assert!(core::mem::size_of::<Result<(), Error>>() == 8);

impl Error {
    /// The errno upstream LUO returns for this condition: the one table (spec §2.6), which
    /// is [`ERRNOS`] for LUO's own conditions.
    #[inline]
    pub const fn errno(self) -> Errno {
        match self {
            Error::Handler(e) | Error::Platform(e) => e,
            own => ERRNOS[own.index()].1,
        }
    }

    /// The condition's row in [`ERRNOS`]: its place in the declaration, which is also what
    /// rustc stores as the discriminant, so this compiles to reading the tag and the errno is
    /// one load (a `match` to errnos is a compare tree: the kernel builds without jump or
    /// lookup tables).
    const fn index(self) -> usize {
        match self {
            Error::BadCommand => 0,
            Error::UnknownCommand => 1,
            Error::WrongDirection => 2,
            Error::StructTooSmall => 3,
            Error::TrailingNonZero => 4,
            Error::Fault => 5,
            Error::ReservedNotZero => 6,
            Error::DeviceBusy => 7,
            Error::IncomingRefused => 8,
            Error::NameEmpty => 9,
            Error::NameUnterminated => 10,
            Error::NameExists => 11,
            Error::NoSuchSession => 12,
            Error::AlreadyRetrieved => 13,
            Error::TokenInUse => 14,
            Error::BadFd => 15,
            Error::NoHandler => 16,
            Error::AlreadyPreserved => 17,
            Error::NoSuchToken => 18,
            Error::FinishRefused => 19,
            Error::NoSpace => 20,
            Error::NoMemory => 21,
            Error::TooManyFds => 22,
            Error::FileTableFull => 23,
            Error::Disabled => 24,
            Error::AlreadyRegistered => 25,
            Error::InvalidDefinition => 26,
            Error::FlbNotFound => 27,
            Error::FlbNoData => 28,
            Error::OwnerGone => 29,
            Error::Serialized => 30,
            Error::Handler(_) => 31,
            Error::Platform(_) => 32,
        }
    }
}

/// Each condition's errno, in declaration order (checked below). The last two rows stand for
/// the conditions that carry their errno, which [`Error::errno`] returns instead.
const ERRNOS: [(Error, Errno); 33] = [
    (Error::BadCommand, EINVAL),
    (Error::UnknownCommand, ENOTTY),
    (Error::WrongDirection, EINVAL),
    (Error::StructTooSmall, EINVAL),
    (Error::TrailingNonZero, E2BIG),
    (Error::Fault, EFAULT),
    (Error::ReservedNotZero, EINVAL),
    (Error::DeviceBusy, EBUSY),
    (Error::IncomingRefused, EIO),
    (Error::NameEmpty, EINVAL),
    (Error::NameUnterminated, EINVAL),
    (Error::NameExists, EEXIST),
    (Error::NoSuchSession, ENOENT),
    (Error::AlreadyRetrieved, EINVAL),
    (Error::TokenInUse, EEXIST),
    (Error::BadFd, EBADF),
    (Error::NoHandler, ENOENT),
    (Error::AlreadyPreserved, EBUSY),
    (Error::NoSuchToken, ENOENT),
    (Error::FinishRefused, EBUSY),
    (Error::NoSpace, ENOSPC),
    (Error::NoMemory, ENOMEM),
    (Error::TooManyFds, EMFILE),
    (Error::FileTableFull, ENFILE),
    (Error::Disabled, EOPNOTSUPP),
    (Error::AlreadyRegistered, EEXIST),
    (Error::InvalidDefinition, EINVAL),
    (Error::FlbNotFound, ENOENT),
    (Error::FlbNoData, ENODATA),
    (Error::OwnerGone, ENODEV),
    (Error::Serialized, ESHUTDOWN),
    (Error::Handler(EINVAL), EINVAL),
    (Error::Platform(EINVAL), EINVAL),
];

const _: () = {
    let mut i = 0;
    while i < ERRNOS.len() {
        assert!(ERRNOS[i].0.index() == i);
        i += 1;
    }
};

/// Allocation failed (the platform's fallible allocators return this).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocError;

impl From<AllocError> for Error {
    fn from(_: AllocError) -> Self {
        Error::NoMemory
    }
}

impl From<AllocError> for HandoverError {
    fn from(_: AllocError) -> Self {
        HandoverError::NoMemory
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Handler(e) => write!(f, "callback failed: {e}"),
            Error::Platform(e) => write!(f, "platform failed: {e}"),
            other => write!(f, "{other:?} ({})", other.errno()),
        }
    }
}

/// Result alias used throughout the crate.
pub type Result<T = (), E = Error> = core::result::Result<T, E>;
