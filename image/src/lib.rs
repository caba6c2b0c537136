//! The image store of the bulkhead CLI (being written).
