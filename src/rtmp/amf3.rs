//! AMF3 values: decode and encode (string, object and trait references), with limits.
