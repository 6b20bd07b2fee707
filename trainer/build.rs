include!("../model/build.rs");
