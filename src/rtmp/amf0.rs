//! AMF0 values: decode and encode, with depth and size limits.
