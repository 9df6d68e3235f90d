//! Cloud drivers behind one `InstanceSet` trait: loopback here; EC2 and Azure behind features.
