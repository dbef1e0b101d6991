# Every library comes through pkg-config from Debian's -dev packages (scripts/setup.sh).
find_package(PkgConfig REQUIRED)
find_package(Threads REQUIRED)
pkg_check_modules(RDKAFKA REQUIRED IMPORTED_TARGET rdkafka)
pkg_check_modules(CURL REQUIRED IMPORTED_TARGET libcurl)
pkg_check_modules(OPENSSL REQUIRED IMPORTED_TARGET libcrypto)
pkg_check_modules(PQ REQUIRED IMPORTED_TARGET libpq)
pkg_check_modules(ARCHIVE REQUIRED IMPORTED_TARGET libarchive)
# The extractor decodes xz itself, with a memory limit that libarchive 3.6 does not set.
pkg_check_modules(LZMA REQUIRED IMPORTED_TARGET liblzma)
pkg_check_modules(DEVMAPPER REQUIRED IMPORTED_TARGET devmapper)
pkg_check_modules(JSONC REQUIRED IMPORTED_TARGET json-c)

add_library(fim_deps INTERFACE)
target_link_libraries(fim_deps INTERFACE
  PkgConfig::RDKAFKA PkgConfig::CURL PkgConfig::OPENSSL PkgConfig::PQ PkgConfig::ARCHIVE
  PkgConfig::LZMA PkgConfig::DEVMAPPER PkgConfig::JSONC Threads::Threads)
