# Finds the CPU BLAS (single-precision GEMM) and defines the imported target lorart::blas.
# Preferred: the scipy-openblas32 wheel from PyPI (a build and runtime dependency of lorart; its
# symbols carry a scipy_ prefix). Fallback: a system CBLAS (e.g. Debian's libopenblas-dev) found by
# FindBLAS. Build glue only.
find_package(Python 3.9 REQUIRED COMPONENTS Interpreter)
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
          "import scipy_openblas32 as s; print(s.get_include_dir()); print(s.get_lib_dir())"
  OUTPUT_VARIABLE _lorart_blas_out
  RESULT_VARIABLE _lorart_blas_rc
  ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)

if(_lorart_blas_rc EQUAL 0)
  string(REPLACE "\n" ";" _lorart_blas_out "${_lorart_blas_out}")
  list(GET _lorart_blas_out 0 LORART_BLAS_INCLUDE_DIR)
  list(GET _lorart_blas_out 1 LORART_BLAS_LIB_DIR)
  add_library(lorart_blas SHARED IMPORTED)
  set_target_properties(lorart_blas PROPERTIES
    IMPORTED_LOCATION "${LORART_BLAS_LIB_DIR}/libscipy_openblas.so"
    INTERFACE_INCLUDE_DIRECTORIES "${LORART_BLAS_INCLUDE_DIR}"
    INTERFACE_COMPILE_DEFINITIONS "LORART_CBLAS_PREFIX_SCIPY=1")
  add_library(lorart::blas ALIAS lorart_blas)
  message(STATUS "lorart: BLAS = scipy-openblas32 (${LORART_BLAS_LIB_DIR})")
else()
  set(BLA_VENDOR OpenBLAS)
  find_package(BLAS)
  find_path(LORART_CBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas)
  if(NOT BLAS_FOUND OR NOT LORART_CBLAS_INCLUDE_DIR)
    message(FATAL_ERROR "lorart needs a BLAS: pip install scipy-openblas32 (or apt-get install "
                        "libopenblas-dev)")
  endif()
  add_library(lorart_blas INTERFACE)
  target_link_libraries(lorart_blas INTERFACE ${BLAS_LIBRARIES})
  target_include_directories(lorart_blas INTERFACE ${LORART_CBLAS_INCLUDE_DIR})
  add_library(lorart::blas ALIAS lorart_blas)
  message(STATUS "lorart: BLAS = system (${BLAS_LIBRARIES})")
endif()
